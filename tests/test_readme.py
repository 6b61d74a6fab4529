"""The README's walkthroughs run as written, in order, in a fresh directory.

A walkthrough is the ``bash`` block after a ``<!-- walkthrough: NAME ... -->`` line. What a
walkthrough starts from on the reader's machine is made here, small: the quick start's teacher
(``data/demo/teacher``, a tiny one), a folder of images, the bucket's endpoint (moto's server;
the README's credential block is site-specific and is what the ``s3_server`` fixture stands for).
Slow: each walkthrough trains real students (mlp:800,800 on 3,000 images).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough(name: str) -> list[str]:
    """The commands of walkthrough ``name``: continuation lines joined, comments and blanks left
    out (bash would skip them too)."""
    text = README.read_text()
    found = re.search(rf"<!-- walkthrough: {name}\b[^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert found, f"README.md has no walkthrough {name!r}"
    commands = []
    for line in found.group(1).replace("\\\n", " ").splitlines():
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
