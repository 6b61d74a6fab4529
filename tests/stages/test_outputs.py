"""Default outputs go under the current directory's data/ (or $KD_OUTPUT_DIR), not into the
checkout kd-pipeline was installed from."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.experiments.config import SweepConfig
from pipeline.experiments.demo import DemoConfig
from pipeline.experiments.specialists.config import SpecialistsConfig
from pipeline.training.config import StudentConfig, TeacherConfig
from stages.cli import main


def test_default_outputs_are_under_the_current_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KD_OUTPUT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert TeacherConfig(model="mlp:8").resolve().out == "data/teachers/mlp-8"
    assert DemoConfig().resolve().out == "data/demo"
    assert SweepConfig(base=StudentConfig(cache="c/x.zarr")).resolve().out == "data/sweeps/x"
    assert SpecialistsConfig(cache="x.zarr.zip").resolve().out == "data/specialists/x"
    run = StudentConfig(cache="x.zarr", student="mlp:8").resolve().out
    assert run == "data/runs/x-mlp-8-kd-mean-probs-T20-a0.9-s0"


def test_kd_output_dir_moves_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KD_OUTPUT_DIR", str(tmp_path / "elsewhere"))
    assert DemoConfig().resolve().out == str(tmp_path / "elsewhere" / "demo")


def test_train_student_without_out_writes_into_the_working_directory(
    cache_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, one_torch_thread: None
) -> None:
    monkeypatch.delenv("KD_OUTPUT_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        main,
        [
            "train-student",
            "--cache",
            str(cache_path),
            "--student",
            "mlp:8",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    run = Path("data/runs/task-mlp-8-kd-mean-probs-T20-a0.9-s0")
    assert f"wrote {run} (student.pt" in res.output
    assert (tmp_path / run / "metrics.json").is_file()
