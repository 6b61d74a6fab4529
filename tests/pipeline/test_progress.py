"""Progress bars draw on a terminal only, never for nothing, and end at 100 %."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.progress import progress_bar


class Terminal(io.StringIO):
    """A stream that says it is a terminal (as a user's stderr does)."""

    def isatty(self) -> bool:
        return True


def test_a_bar_draws_on_a_terminal_only() -> None:
    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        bar = progress_bar(total=3, file=stream, desc="work", unit="step")
        bar.update(3)
        bar.close()
    assert "work: 100%" in tty.getvalue() and "3/3" in tty.getvalue()
    assert log.getvalue() == ""


def test_quiet_and_empty_bars_draw_nothing() -> None:
    tty = Terminal()
    for kwargs in ({"total": 0}, {"total": 5, "enabled": False}):
        bar = progress_bar(file=tty, desc="sweep", unit="setting", **kwargs)
        bar.close()
        assert bar.disable
    assert tty.getvalue() == ""  # not "sweep: 0setting [00:00, ?setting/s]"


def test_an_iterable_bar_takes_its_length() -> None:
    tty = Terminal()
    assert list(progress_bar([1, 2], file=tty, desc="x")) == [1, 2]
    assert "x: 100%" in tty.getvalue()
    assert list(progress_bar([], file=tty, desc="y")) == []
    assert "y:" not in tty.getvalue()


def test_cache_verify_bar_ends_at_100_percent(
    cache_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It counted metadata and done flags in its total but not as they were read: it stopped at
    84-91 %."""
    from pipeline.cache.verify import verify_cache

    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert verify_cache(cache_path, progress=True).ok
    states = [s for s in re.split(r"[\r\n]", tty.getvalue()) if s.startswith("verify:")]
    assert states and "100%" in states[-1]


def test_cli_output_into_a_file_has_no_bars(
    cache_path: Path, teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    """CliRunner's streams are not terminals, as a log file is not: no tqdm redraws in it."""
    from stages.cli import main

    runner = CliRunner()
    outs = [
        runner.invoke(
            main,
            [
                "cache-logits",
                "--teacher",
                str(teacher_dir),
                "--dataset",
                f"npz:{npz_path}:train",
                "--out",
                str(tmp_path / "c.zarr"),
                "--device",
                "cpu",
            ],
        ),
        runner.invoke(main, ["cache", "verify", str(cache_path)]),
    ]
    for _ in range(2):  # the second sweep has nothing left to run
        outs.append(
            runner.invoke(
                main,
                [
                    "sweep",
                    "--cache",
                    str(cache_path),
                    "-T",
                    "2",
                    "--alpha",
                    "1",
                    "--student",
                    "mlp:8",
                    "--epochs",
                    "1",
                    "--workers",
                    "0",
                    "--device",
                    "cpu",
                    "--out",
                    str(tmp_path / "sweep"),
                ],
            )
        )
    for res in outs:
        assert res.exit_code == 0, res.output
        assert "\r" not in res.output and "it/s" not in res.output and "%|" not in res.output
    assert "0setting" not in outs[-1].output and "1 reused" in outs[-1].output
