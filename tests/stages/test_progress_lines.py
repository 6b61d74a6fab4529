"""Progress a log file shows: with stdout not a terminal, every long step prints plain lines with
its rate and the time left (at a bounded interval), and ``--quiet`` prints none."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import progress
from stages.cli import main
from tests.helpers.data import make_image_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
LEFT = r", (\d+s|\d+m \d\ds|\d+h \d\dm) left"


def kd(*args: str, seconds: str | None = "0") -> subprocess.CompletedProcess:
    """The real ``kd-pipeline`` in a process of its own, its output captured (a pipe: no tty)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("KD_PROGRESS_SECONDS", None)
    if seconds is not None:
        env["KD_PROGRESS_SECONDS"] = seconds  # 0: a line at every update (not only every 30 s)
    return subprocess.run(
        [sys.executable, "-m", "stages.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def test_cache_logits_and_training_print_rate_and_time_left_into_a_pipe(
    teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "c.zarr"
    res = kd(
        "cache-logits", "--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train",
        "--rows-per-shard", "64", "--device", "cpu", "--out", str(cache),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [s for s in res.stdout.splitlines() if s.startswith("cache-logits: ")]
    # 600 rows in 10 shards: a line after each shard but the last (whose end the result says)
    assert len(lines) == 9, res.stdout
    assert all(re.fullmatch(r"cache-logits: \d+/600 rows, [\d,.]+ rows/s" + LEFT, s) for s in lines)
    assert [int(s.split()[1].split("/")[0]) for s in lines] == [64 * k for k in range(1, 10)]
    assert "\r" not in res.stdout + res.stderr  # no bar redraws in a log

    run = tmp_path / "run"
    args = ["train-student", "--cache", str(cache), "--student", "mlp:8", "--epochs", "2",
            "--batch-size", "64", "--device", "cpu", "--out", str(run)]  # fmt: skip
    res = kd(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [s for s in res.stdout.splitlines() if " batches, " in s]
    assert [s.split(",")[0] for s in lines] == [
        f"student epoch {e}/2: {b}/10 batches" for e in (1, 2) for b in range(1, 10)
    ]
    assert all(re.fullmatch(r"[^,]+, [\d,.]+ rows/s" + LEFT, s) for s in lines)
    # --quiet: nothing but the result; the default interval (30 s): no line in a short run
    quiet = kd(*args, "--overwrite", "--quiet")
    assert quiet.returncode == 0 and " left" not in quiet.stdout, quiet.stdout
    default = kd(*args, "--overwrite", seconds=None)
    assert default.returncode == 0 and " left" not in default.stdout, default.stdout


def test_cache_verify_copy_and_pack_print_sizes_rate_and_time_left(
    cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CliRunner's output is no terminal either: the lines count bytes, as the bars do."""
    monkeypatch.setenv("KD_PROGRESS_SECONDS", "0")
    runner = CliRunner()
    size = r"\d+(\.\d)? (B|kB|MB)"
    for quiet in ([], ["--quiet"]):
        q = "q" if quiet else ""
        for desc, args in (
            ("verify", ["cache", "verify", str(cache_path)]),
            ("copy", ["cache", "copy", str(cache_path), str(tmp_path / f"copy{q}.zarr")]),
            ("pack", ["cache", "pack", str(cache_path), str(tmp_path / f"c{q}.zarr.zip")]),
        ):
            res = runner.invoke(main, [*args, *quiet])
            assert res.exit_code == 0, res.output
            lines = [s for s in res.output.splitlines() if " left" in s]
            if quiet:
                assert lines == [], res.output
                continue
            # copy and pack verify what they wrote: their own lines, then verify's
            assert lines and lines[0].startswith(f"{desc}: "), res.output
            assert all(
                re.fullmatch(f"(copy|pack|verify): {size}/{size}, {size}/s" + LEFT, s)
                for s in lines
            ), lines


def test_lines_come_every_interval_or_each_tenth_but_never_closer_than_the_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rule on a clock that steps one second per update: a loop of 1,000 s prints at least
    every 30 s, plus at each tenth, never within 10 s of the previous line; one of 60 s every
    10 s (its tenths come every 6 s, the gap holds them back); one of 9 s nothing."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.delenv("KD_PROGRESS_SECONDS", raising=False)

    def lines_of(steps: int) -> list[str]:
        now[0] = 0.0
        out: list[str] = []
        bar = progress.progress_bar(total=steps, desc="work", unit="row", log=out.append)
        for _ in range(steps):
            now[0] += 1.0
            bar.update(1)
        return out

    long = lines_of(1000)
    assert long[0] == "work: 30/1000 rows, 1.00 rows/s, 16m 10s left"
    at = [0] + [int(s.split()[1].split("/")[0]) for s in long]  # the second of each line
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert all(10 <= g <= 30 for g in gaps) and at[-1] >= 970
    assert {100 * k for k in range(1, 10)} <= set(at)  # each tenth, where 10 s had passed
    assert len(long) == 39  # bounded: 1,000 s / 30 s, and a few more at the tenths
    assert [s.split()[1] for s in lines_of(60)] == ["10/60", "20/60", "30/60", "40/60", "50/60"]
    assert lines_of(9) == []


class Terminal(io.StringIO):
    """A stream that says it is a terminal (as a user's stderr does)."""

    def isatty(self) -> bool:
        return True


def test_a_bar_on_the_terminal_and_lines_in_the_redirected_output(
    cache_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``kd-pipeline ... > log``: stderr is a terminal (the bar draws there), stdout a file (it
    gets the lines); the same for a training epoch's lines through its log."""
    from pipeline.cache.verify import verify_cache
    from pipeline.training.loop import fit
    from pipeline.training.losses import DistillationLoss
    from pipeline.training.sources import InMemorySource
    from pipeline.training.train_config import TrainConfig

    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("KD_PROGRESS_SECONDS", "0")
    assert verify_cache(cache_path, progress=True).ok
    assert "verify: 100%" in tty.getvalue()  # the bar
    lines = capsys.readouterr().out.splitlines()  # pytest's stdout: no terminal
    assert lines and all(re.fullmatch(r"verify: .+/s" + LEFT, s) for s in lines), lines

    x, y = make_image_task(600, 0)
    logged: list[str] = []
    fit(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].size, 5)),
        InMemorySource(x, y, batch_size=100),
        DistillationLoss(alpha=0.0),
        TrainConfig(epochs=1, batch_size=100),
        torch.device("cpu"),
        log=logged.append,
    )
    assert "train epoch 1/1:   0%" in tty.getvalue()  # the epoch's bar (cleared at its end)
    assert [s.split(",")[0] for s in logged if " batches, " in s] == [
        f"train epoch 1/1: {b}/6 batches" for b in range(1, 6)
    ]
