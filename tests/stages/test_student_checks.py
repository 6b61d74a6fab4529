"""train-student's checks before training: a student spec that does not fit the data is one
error about the spec, and a run directory holding another run is not silently replaced."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["--epochs", "1", "--batch-size", "64", "--device", "cpu", "--quiet"]


def train(*args: str) -> tuple[int, str]:
    """``kd-pipeline train-student ARGS`` in process."""
    return cli("train-student", *args)


@pytest.fixture
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module of student factories on sys.path, a corrupt and a good TorchScript file."""
    (tmp_path / "kd_user_students.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def ignores_in_shape(in_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))

        def no_tensor(in_shape, num_classes):
            class Odd(nn.Module):
                def forward(self, x):
                    return {"logits": x}
            return Odd()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "corrupt.pt").write_bytes(b"not a TorchScript archive")
    with warnings.catch_warnings():  # torch deprecates scripting; the test needs a .pt to load
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)))
    net.save(str(tmp_path / "good.pt"))
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "py:kd_user_students:ignores_in_shape",
            "error: student py:kd_user_students:ignores_in_shape fails on a batch of inputs of "
            "shape (2, 1, 8, 8) (the transfer set's samples are (1, 8, 8)): RuntimeError: mat1 "
            "and mat2 shapes cannot be multiplied (2x64 and 784x5); build the network for "
            "in_shape=(1, 8, 8)",
        ),
        (
            "torchscript:{dir}/corrupt.pt",
            "error: student torchscript:{dir}/corrupt.pt: cannot be built for inputs of shape "
            "(1, 8, 8) and 5 classes (RuntimeError: PytorchStreamReader failed",
        ),
        (
            "py:json:loads",
            "error: model spec 'py:json:loads': the factory json.loads(in_shape=(1, 8, 8), "
            "num_classes=5) raised TypeError: loads() missing 1 required positional argument: "
            "'s'; fix that factory (the error is in it, not in kd-pipeline)",
        ),
        (
            "py:kd_user_students:no_tensor",
            "error: student py:kd_user_students:no_tensor returns dict for a batch of shape "
            "(2, 1, 8, 8); expected logits of shape (2, 5)",
        ),
    ],
)
def test_a_student_that_does_not_fit_is_one_error_naming_the_spec(
    cache_path: Path, user_code: Path, tmp_path: Path, spec: str, expected: str
) -> None:
    out = tmp_path / "run"
    code, output = train(
        "--cache",
        str(cache_path),
        "--student",
        spec.format(dir=user_code),
        *QUICK,
        "--out",
        str(out),
    )
    assert code == 2
    assert expected.format(dir=user_code) in output
    assert "Traceback" not in output
    assert not (out / "history.csv").exists()  # refused before training


def test_a_torchscript_student_loads_without_torchs_deprecation_warning(user_code: Path) -> None:
    from pipeline.models import build_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(f"torchscript:{user_code / 'good.pt'}", (1, 8, 8), 5)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    assert not [w for w in caught if "torch.jit" in str(w.message)]


def test_a_run_of_another_config_is_not_replaced_without_overwrite(
    cache_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    common = ["--cache", str(cache_path), "--student", "mlp:16", *QUICK, "--out", str(out)]
    assert train(*common, "-T", "4")[0] == 0
    before = (out / "metrics.json").read_bytes()

    code, output = train(*common, "-T", "2")
    assert code == 2
    assert (
        f"--out {out} already holds a run of another config (temperature: 4.0 there, 2.0 "
        "now); choose another --out, or pass --overwrite to replace it"
    ) in output
    assert (out / "metrics.json").read_bytes() == before

    code, output = train(*common, "-T", "2", "--overwrite")
    assert code == 0, output
    assert json.loads((out / "config.json").read_text())["temperature"] == 2.0
    assert json.loads((out / "metrics.json").read_text())["config"]["temperature"] == 2.0
    assert "overwrite" not in json.loads((out / "config.json").read_text())  # not part of a run


def test_a_finished_run_is_reused_from_any_copy_of_its_cache_and_overwrite_retrains(
    cache_path: Path, tmp_path: Path
) -> None:
    """One rule with demo and sweep: the same config on the same cache is reused, also when the
    cache is read from elsewhere (the README's bucket-then-bundle walkthrough once exited 2)."""
    import shutil

    out = tmp_path / "run"
    args = ["--student", "mlp:16", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    code, first = train("--cache", str(cache_path), *args, "--quiet")
    assert code == 0, first
    result = next(line for line in first.splitlines() if line.startswith("student: "))
    assert "test errors (" in result and "% accuracy" in result  # --quiet keeps the result
    before = (out / "metrics.json").read_bytes()

    copy = tmp_path / "elsewhere" / cache_path.name
    shutil.copytree(cache_path, copy)
    code, output = train("--cache", str(copy), *args)
    assert code == 0, output
    assert f"reusing the finished run in {out} (the same config on the same soft targets" in output
    assert result in output and output.count(f"wrote {out}") == 1
    assert (out / "metrics.json").read_bytes() == before

    code, output = train("--cache", str(cache_path), *args, "--overwrite")
    assert code == 0, output
    assert f"replacing the run in {out} (the same config, trained again)" in output
    assert output.count("student: ") == 1 and output.count(f"wrote {out}") == 1
