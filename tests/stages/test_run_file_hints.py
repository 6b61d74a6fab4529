"""The hint after an unknown key of a run file names a key only when the names are alike, not
when the keys merely share their table (``train.bogus`` is not "train.log_to")."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from stages.cli import main


def test_a_hint_only_for_a_name_that_is_alike(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text(
        'cache = "c.zarr"\ntemprature = 2\n[train]\nbogus = 3\nlrr = 0.1\n[train.inner]\nx = 1\n'
    )
    res = CliRunner().invoke(main, ["train-student", "--config", str(bad)])
    assert res.exit_code == 2, res.output
    lines = [line.split(": ", 1)[1] for line in res.output.splitlines() if "--config" in line]
    assert sorted(lines) == [
        "unknown key 'temprature'; did you mean temperature?",
        "unknown key 'train.bogus'",
        "unknown key 'train.inner'",
        "unknown key 'train.lrr'; did you mean train.lr?",
    ]
    assert not (tmp_path / "data").exists()


def test_a_teacher_file_given_to_train_student_names_no_false_hint() -> None:
    """``dropout`` is not "out" (a hint needs three quarters of the name alike)."""
    teacher = Path(__file__).resolve().parents[2] / "configs" / "demo" / "teacher.toml"
    res = CliRunner().invoke(main, ["train-student", "--config", str(teacher), "--print-config"])
    assert res.exit_code == 2, res.output
    lines = [line.split(": ", 1)[1] for line in res.output.splitlines() if "--config" in line]
    assert sorted(lines) == [
        "unknown key 'dropout'",
        "unknown key 'input_dropout'",
        "unknown key 'jitter'",
        "unknown key 'model'",
    ]
