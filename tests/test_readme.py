"""The README's walkthroughs run as written, in order, in a fresh directory.

A walkthrough is the ``bash`` block after a ``<!-- walkthrough: NAME ... -->`` line; every marked
block has a test here (:data:`TESTED`), so none drops out unnoticed. What a walkthrough starts from
on the reader's machine is made here, small: the quick start's teacher (``data/demo/teacher``, a
tiny one), the sparse section's ``big.npz`` and teacher, the bucket's endpoint (moto's server; the
README's credential block is site-specific and is what the ``s3_server`` fixture stands for).

Left unmarked: blocks that need torchvision, a GPU, several hosts or a cluster, and those that
train on all of Fashion-MNIST (many minutes on a CPU: the quick start itself, the teacher recipes,
the sequence study); ``.ci/run`` runs the quick start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


MARKER = re.compile(r"<!-- walkthrough: (\S+)\b[^>]*-->\n```bash\n(.*?)```", re.S)

#: Every walkthrough the README marks, each run by a test below.
TESTED = {"sharing", "sparse"}


def walkthrough(name: str) -> list[str]:
    """The commands of walkthrough ``name``: continuation lines joined, comments and blanks left
    out (bash would skip them too)."""
    found = dict(MARKER.findall(README.read_text()))
    assert name in found, f"README.md has no walkthrough {name!r}"
    commands = []
    for line in found[name].replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line)
    return commands


def run_all(commands: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    """Run each command with bash in ``cwd``; every one must exit 0. Returns their outputs."""
    outputs = []
    for cmd in commands:
        res = subprocess.run(
            ["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
        )
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"README command exited {res.returncode}: {cmd}\n{out}"
        outputs.append(out)
    return outputs


def shell_env() -> dict[str, str]:
    """This interpreter's ``python`` and ``kd-pipeline`` first on PATH, the project importable."""
    root = str(README.parent)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


def test_walkthroughs_are_found() -> None:
    names = [name for name, _ in MARKER.findall(README.read_text())]
    # Every marked block has its test, and none was unmarked (or renamed) silently.
    assert sorted(names) == sorted(TESTED) and len(names) == 2
    sharing = walkthrough("sharing")
    assert sharing[0].startswith("python -c") and "s3fs" in sharing[0]  # the bucket first
    assert sum(c.startswith("kd-pipeline train-student") for c in sharing) == 2


@pytest.mark.slow
def test_the_sharing_walkthrough_runs_as_written(s3_server: str, tmp_path: Path) -> None:
    from pipeline.config import TeacherConfig
    from pipeline.training.loop import TrainConfig
    from pipeline.training.teacher import train_teacher

    # the quick start's teacher, tiny
    cfg = TeacherConfig(
        dataset="fashion-mnist:train:count=500:seed=0",
        model="mlp:32",
        members=1,
        out=str(tmp_path / "data/demo/teacher"),
        device="cpu",
        train=TrainConfig(epochs=1),
    )
    train_teacher(cfg, log=lambda s: None)
    outputs = run_all(walkthrough("sharing"), tmp_path, shell_env())
    text = "\n".join(outputs)
    assert "complete: 3000 rows x 10 classes x 1 member(s)" in text
    assert "fm-demo.zarr" in outputs[3]  # cache ls lists it
    assert outputs[4].count("student: ") == 1 and outputs[7].count("student: ") == 1
    runs = sorted(p.name for p in (tmp_path / "data/runs").iterdir())
    assert runs == [
        "fm-demo-mlp-800-800-kd-mean-probs-T20-a0.9-s0",
        "fm-demo-mlp-800-800-kd-mean-probs-T4-a0.9-s0",
    ]
    assert (tmp_path / "fm-demo.zarr.zip").is_file()
    # the bundle's default run (T = 20) is the bucket's: reused, not refused (it exited 2)
    again = run_all(
        ["kd-pipeline train-student --cache fm-demo.zarr.zip --student mlp:800,800"],
        tmp_path,
        shell_env(),
    )[0]
    assert "reusing the finished run in data/runs/fm-demo-mlp-800-800" in again


@pytest.mark.slow  # five commands, two students trained with the defaults: ~25 s of CPU
def test_the_sparse_walkthrough_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.config import TeacherConfig
    from pipeline.training.loop import TrainConfig
    from pipeline.training.teacher import train_teacher
    from tests.helpers.data import write_npz

    # What the section starts from: a transfer set with more classes than topk:20 keeps, and a
    # teacher on it (small: the student's defaults train on 200 rows).
    write_npz(tmp_path / "big.npz", n_train=200, n_test=100, classes=30)
    cfg = TeacherConfig(
        dataset="npz:big.npz:train",
        model="mlp:32",
        members=1,
        out=str(tmp_path / "data/teachers/big"),
        device="cpu",
        train=TrainConfig(epochs=2),
    )
    monkeypatch.chdir(tmp_path)  # the spec is relative, as in the README
    train_teacher(cfg, log=lambda s: None)
    commands = walkthrough("sparse")
    assert len(commands) == 5
    out = run_all(commands, tmp_path, shell_env())
    assert "complete: 200 rows x 30 classes x 1 member(s)" in out[0] + out[1]
    assert "topk" in out[2] and "fidelity" in out[2]
    assert out[3].count("student: ") == 1 and out[4].count("student: ") == 1
    assert "interpolat" in out[4]
