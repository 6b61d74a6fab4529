"""The ``kd-pipeline`` command line, through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import Result

from pipeline import __version__
from pipeline.checkpoints import load_checkpoint
from pipeline.datasets import load_dataset
from stages.cli import main
from tests.helpers.cli import invoke


def _commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``group``, recursively, with the argv path that reaches it."""
    out = []
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, path)
    return out


ALL_COMMANDS = _commands(main)


def test_the_command_tree_is_what_we_test() -> None:
    names = {" ".join(p) for p, _ in ALL_COMMANDS}
    assert {"train-teacher", "evaluate", "cache-logits", "cache", "cache info", "demo"} <= names


def test_group_help_and_version() -> None:
    res = invoke("--help")
    assert res.exit_code == 0, res.output
    assert "Knowledge distillation" in res.output
    for path, _ in ALL_COMMANDS:
        if len(path) == 1:
            assert path[0] in res.output
    assert invoke("-h").output == res.output
    ver = invoke("--version")
    assert ver.exit_code == 0 and __version__ in ver.output


@pytest.mark.parametrize(("path", "cmd"), ALL_COMMANDS, ids=[" ".join(p) for p, _ in ALL_COMMANDS])
def test_every_subcommand_has_help_and_every_option_is_documented(
    path: tuple[str, ...], cmd: click.Command
) -> None:
    res = invoke(*path, "--help")
    assert res.exit_code == 0, res.output
    assert (
        f"Usage: main {' '.join(path)}" in res.output or f"{' '.join(path)} [OPTIONS]" in res.output
    )
    assert cmd.help and cmd.help.strip(), f"{' '.join(path)} has no docstring"
    undocumented = [
        p.name for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()
    ]
    assert undocumented == [], f"{' '.join(path)}: options without help: {undocumented}"
    for p in cmd.params:
        if isinstance(p, click.Option):
            assert p.opts[0] in res.output  # every option shows in --help


def test_group_options_are_documented() -> None:
    assert all((p.help or "").strip() for p in main.params if isinstance(p, click.Option))


# ---------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def cli_teacher(tmp_path_factory: pytest.TempPathFactory, npz_path: Path) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("cli-teacher") / "ens"
    res = invoke(
        "train-teacher",
        "--dataset",
        f"npz:{npz_path}:train",
        "--eval",
        f"npz:{npz_path}:test",
        "--model",
        "mlp:32",
        "--epochs",
        "2",
        "--members",
        "2",
        "--jitter",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "64",
        "--out",
        str(out),
    )
    return out, res


def test_train_teacher_quiet_prints_the_result_only(
    tmp_path: Path, npz_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KD_PROGRESS_SECONDS", "0")  # progress lines would show if not hidden
    out = tmp_path / "ens"
    res = invoke(
        "train-teacher", "--dataset", f"npz:{npz_path}:train", "--eval", f"npz:{npz_path}:test",
        "--model", "mlp:8", "--epochs", "1", "--members", "1", "--device", "cpu", "--quiet",
        "--out", str(out)
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    e = json.loads((out / "ensemble.json").read_text())["test"]["ensemble"]
    assert res.output.splitlines() == [
        f"ensemble of 1: {e['errors']} test errors ({100 * e['accuracy']:.2f} % accuracy) on "
        f"npz:{npz_path}:test",
        f"wrote {out}; next: kd-pipeline cache-logits --teacher {out} "
        f"--dataset npz:{npz_path}:train",
    ]


def test_train_teacher_writes_members_and_summary(
    cli_teacher: tuple[Path, Result], npz_path: Path
) -> None:
    out, res = cli_teacher
    assert res.exit_code == 0, res.output
    assert (out / "member-0.pt").is_file() and (out / "member-1.pt").is_file()
    assert not (out / "member-2.pt").exists()
    assert f"wrote {out}" in res.output and "next: kd-pipeline cache-logits" in res.output
    summary = json.loads((out / "ensemble.json").read_text())
    assert summary["members"] == ["member-0.pt", "member-1.pt"]
    assert summary["model_spec"] == "mlp:32:input_dropout=0.2:dropout=0.5"
    assert summary["dataset"] == f"npz:{npz_path}:train"
    assert summary["config"]["train"]["epochs"] == 2 and summary["config"]["jitter"] == 0
    assert summary["test"]["dataset"] == f"npz:{npz_path}:test"
    assert len(summary["test"]["members"]) == 2 and summary["test"]["ensemble"]["n"] == 300
    train = load_dataset(f"npz:{npz_path}:train")
    for i in range(2):
        lm = load_checkpoint(out / f"member-{i}.pt")
        assert lm.meta["dataset"] == {"spec": train.spec, "fingerprint": train.fingerprint}
        assert lm.meta["in_shape"] == [1, 8, 8] and lm.meta["num_classes"] == 5
        assert lm.meta["config"]["member"] == i and lm.meta["config"]["seed"] == i
        assert lm.meta["metrics"]["errors"] == summary["test"]["members"][i]["errors"]
        assert lm.meta["final_epoch"]["epoch"] == 2
        assert (out / f"member-{i}.history.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_evaluate_json_is_consistent(cli_teacher: tuple[Path, Result], npz_path: Path) -> None:
    out, _ = cli_teacher
    res = invoke(
        "evaluate",
        "--model",
        str(out),
        "--dataset",
        f"npz:{npz_path}:test",
        "--json",
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["dataset"] == f"npz:{npz_path}:test"
    assert [Path(p).name for p in data["paths"]] == ["member-0.pt", "member-1.pt"]
    assert data["method"] == "mean-probs"
    for m in [*data["members"], data["ensemble"]]:
        assert m["n"] == 300
        assert m["errors"] == round((1 - m["accuracy"]) * 300)
        assert sum(m["per_class_errors"]) == m["errors"]
        assert 0 <= m["ece"] <= 1 and m["nll"] > 0
    # Same models, same data: the numbers train-teacher recorded.
    summary = json.loads((out / "ensemble.json").read_text())
    assert data["ensemble"]["errors"] == summary["test"]["ensemble"]["errors"]
    assert [m["errors"] for m in data["members"]] == [
        m["errors"] for m in summary["test"]["members"]
    ]
    # 2 epochs on an easy task: clearly better than chance (80% errors).
    assert data["ensemble"]["errors"] < 150


def test_evaluate_table(cli_teacher: tuple[Path, Result], npz_path: Path) -> None:
    out, _ = cli_teacher
    res = invoke(
        "evaluate",
        "--model",
        str(out / "member-1.pt"),
        "--dataset",
        f"npz:{npz_path}:test",
        "--device",
        "cpu",
        "--ensemble",
        "mean-logits",
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:5] == ["model", "errors", "accuracy", "NLL", "ECE"]
    assert len(lines) == 2 and lines[1].startswith("member-1.pt")  # one model: no ensemble row


def _assert_clean_error(res: Result, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)
    assert "error:" in res.output
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in res.output


def test_bad_dataset_spec_exits_2_without_traceback(tmp_path: Path) -> None:
    res = invoke(
        "train-teacher",
        "--dataset",
        "bogus:train",
        "--eval",
        "",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "t"),
    )
    _assert_clean_error(res, "unknown dataset 'bogus'")
    res = invoke(
        "train-teacher",
        "--dataset",
        "fashion-mnist:train:fraction=2",
        "--eval",
        "",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "t"),
    )
    _assert_clean_error(res, "fraction= expects a number in (0, 1]")


def test_bad_dataset_spec_on_evaluate(cli_teacher: tuple[Path, Result]) -> None:
    out, _ = cli_teacher
    res = invoke(
        "evaluate",
        "--model",
        str(out),
        "--dataset",
        "npz:/no/such/file.npz:test",
        "--device",
        "cpu",
    )
    _assert_clean_error(res, "no such file")


def test_invalid_config_lists_problems(tmp_path: Path) -> None:
    res = invoke(
        "train-teacher",
        "--members",
        "0",
        "--jitter",
        "-1",
        "--epochs",
        "0",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "t"),
    )
    _assert_clean_error(res, "members must be >= 1", "jitter must be >= 0", "epochs must be >= 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2(
    cli_teacher: tuple[Path, Result], npz_path: Path, tmp_path: Path
) -> None:
    out, _ = cli_teacher
    res = invoke(
        "evaluate", "--model", str(out), "--dataset", f"npz:{npz_path}:test", "--device", "cuda"
    )
    _assert_clean_error(
        res, "--device cuda was asked for but torch sees no CUDA device", "--device cpu"
    )
    res = invoke(
        "train-teacher",
        "--dataset",
        f"npz:{npz_path}:train",
        "--eval",
        "",
        "--device",
        "cuda",
        "--out",
        str(tmp_path / "t"),
    )
    _assert_clean_error(res, "no CUDA device")
    assert not (tmp_path / "t" / "member-0.pt").exists()


def test_unknown_device_name(cli_teacher: tuple[Path, Result], npz_path: Path) -> None:
    out, _ = cli_teacher
    res = invoke(
        "evaluate", "--model", str(out), "--dataset", f"npz:{npz_path}:test", "--device", "tpu"
    )
    _assert_clean_error(res, "unknown device 'tpu'")
