"""Run-file values of fields parsed from text: one number for a list field is a one-item list
(as its flag reads it), and a list for a one-value field is refused (exit 2, no traceback)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from click.testing import CliRunner

from stages.cli import main


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def test_one_number_for_a_list_field_is_a_one_item_list(tmp_path: Path) -> None:
    """``seeds = 3`` is ``--seeds 3`` (it was an internal error: 'int' is not iterable)."""
    grid = tmp_path / "grid.toml"
    grid.write_text('seeds = 3\ntemperatures = 4\nstudents = ["mlp:8"]\n[base]\ncache = "c.zarr"\n')
    code, out = run("sweep", "--config", str(grid), "--print-config")
    assert code == 0, out
    table = tomllib.loads(out)
    assert (table["seeds"], table["temperatures"]) == ([3], [4.0])
    code, flags = run(
        "sweep", "--cache", "c.zarr", "--student", "mlp:8", "--seeds", "3", "-T", "4",
        "--print-config",
    )  # fmt: skip
    assert code == 0 and flags == out


def test_a_list_for_a_one_value_field_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text('cache = "c.zarr"\nmemory_budget = [1]\n[train]\ngrad_clip = [1.0]\n')
    code, out = run("train-student", "--config", str(bad), "--print-config")
    assert code == 2 and "Traceback" not in out
    assert "memory_budget: expected text like the flag's (SIZE), got [1]" in out
    assert "train.grad_clip: expected" in out and "got [1.0]" in out
    members = tmp_path / "members.toml"
    members.write_text('cache = "c.zarr"\nmembers = [0, 2]\nmemory_budget = "2G"\n')
    code, out = run("train-student", "--config", str(members), "--print-config")
    assert code == 0, out
    assert tomllib.loads(out)["members"] == [0, 2]
    assert tomllib.loads(out)["memory_budget"] == 2 * 1024**3


def test_a_files_unknown_keys_bad_types_and_out_of_range_values_come_in_one_report(
    tmp_path: Path,
) -> None:
    """Fixing a run file is one round: the checks of the values that parsed are reported with the
    keys and types the file got wrong (they were a second run's surprise)."""
    run = tmp_path / "run.toml"
    run.write_text('cache = "c.zarr"\nepochs = 3\n[train]\nlr = "fast"\nseed = -2\n')
    res = CliRunner().invoke(main, ["train-student", "--config", str(run), "--print-config"])
    assert res.exit_code == 2, res.output
    assert "unknown key 'epochs'" in res.output
    assert "train.lr: expected a number" in res.output
    assert "seed" in res.output and "-2" in res.output
    assert "Traceback" not in res.output
