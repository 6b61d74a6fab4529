"""Experiment tracking through the real CLI: ``metrics.jsonl`` in every run directory, and
``--log-to tensorboard`` event files read back by TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.cli import main
from tests.helpers.optional import require

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDENT = ["--student", "mlp:16", "--batch-size", "64", "--device", "cpu", "--quiet"]


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``logdir``'s event files, read by TensorBoard's own reader."""
    accumulator = require("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_jsonl_holds_the_config_every_step_and_the_history_rows(
    cache_path: Path, npz_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, output = invoke(
        "train-student", "--cache", str(cache_path), *STUDENT, "--epochs", "2", "-T", "4",
        "--alpha", "0.5", "--eval", f"npz:{npz_path}:test", "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    rows = history(out / "history.csv")
    got = records(out / "metrics.jsonl")
    assert got[0] == {"record": "config", "config": json.loads((out / "config.json").read_text())}
    epochs = [r for r in got if r["record"] == "epoch"]
    steps = [r for r in got if r["record"] == "step"]
    assert len(epochs) == 2 and len(got) == 1 + 2 + len(steps)
    for row, rec in zip(rows, epochs, strict=True):
        # the same values as history.csv (which writes each float's repr), its `steps` as `step`
        assert rec["step"] == int(row["steps"])
        assert {k: str(v) for k, v in rec.items() if k not in ("record", "step")} == {
            k: v for k, v in row.items() if k != "steps"
        }
    # 600 rows in batches of 64: 10 steps an epoch, the last of 24 rows; an epoch's loss is the
    # row-weighted mean of its steps' losses.
    assert [(r["epoch"], r["step"]) for r in steps] == [(e, s) for e in (1, 2) for s in range(
        10 * e - 9, 10 * e + 1)]  # fmt: skip
    sizes = [64] * 9 + [24]
    for e, rec in enumerate(epochs, 1):
        mine = [r for r in steps if r["epoch"] == e]
        for part in ("loss", "soft", "hard"):
            mean = sum(r[part] * n for r, n in zip(mine, sizes, strict=True)) / 600
            assert mean == pytest.approx(rec[part], rel=1e-5)
        assert sum(r["train_errors"] for r in mine) == rec["train_errors"]
        assert all(r["loss"] == pytest.approx(0.5 * r["soft"] + 0.5 * r["hard"]) for r in mine)
    assert steps[0]["lr"] == 1e-3  # the peak rate (no warmup): what the first step used
    assert steps[-1]["lr"] < steps[1]["lr"] < steps[0]["lr"]  # cosine decay


def test_tensorboard_event_files_hold_the_history_and_each_step(
    cache_path: Path, tmp_path: Path
) -> None:
    require("tensorboard")
    out = tmp_path / "run"
    code, output = invoke(
        "train-student", "--cache", str(cache_path), *STUDENT, "--epochs", "2",
        "--log-to", "tensorboard", "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    files = "student.pt, metrics.json, history.csv, metrics.jsonl, config.json, config.toml"
    assert f"wrote {out} ({files}, tensorboard/)" in output
    got = scalars(out / "tensorboard")
    rows = history(out / "history.csv")
    for key in ("loss", "soft", "hard", "train_errors", "lr"):
        want = [(int(r["epoch"]), float(r[key])) for r in rows]
        assert [s for s, _ in got[f"epoch/{key}"]] == [1, 2]
        assert [v for _, v in got[f"epoch/{key}"]] == pytest.approx([v for _, v in want])
    steps = [r for r in records(out / "metrics.jsonl") if r["record"] == "step"]
    assert got["step/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert len(got["step/lr"]) == 20
    # Trained again into the same directory: one run's events, not two (and not another config).
    code, output = invoke(
        "train-student", "--cache", str(cache_path), *STUDENT, "--epochs", "2",
        "--log-to", "tensorboard", "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(scalars(out / "tensorboard")["epoch/loss"]) == 2


def test_log_to_is_not_part_of_what_a_run_is(cache_path: Path, tmp_path: Path) -> None:
    """A finished run asked for again with --log-to tensorboard is the same config (no
    --overwrite needed), trained again for the log; asked for again without it, it is reused."""
    require("tensorboard")
    out = tmp_path / "run"
    base = ["train-student", "--cache", str(cache_path), *STUDENT, "--epochs", "1"]
    assert invoke(*base, "--out", str(out))[0] == 0
    code, output = invoke(*base, "--log-to", "tensorboard", "--out", str(out))
    assert code == 0, output
    assert "reusing" not in output
    assert scalars(out / "tensorboard")["epoch/loss"][0][0] == 1
    code, output = invoke(*base, "--out", str(out))
    assert code == 0 and f"reusing the finished run in {out}" in output, output


def test_train_teacher_tracks_each_member(npz_path: Path, tmp_path: Path) -> None:
    require("tensorboard")
    out = tmp_path / "ens"
    code, output = invoke(
        "train-teacher", "--dataset", f"npz:{npz_path}:train", "--eval", f"npz:{npz_path}:test",
        "--model", "mlp:8", "--epochs", "2", "--members", "2", "--device", "cpu", "--quiet",
        "--log-to", "tensorboard", "--out", str(out),
    )  # fmt: skip
    assert code == 0, output
    for i in range(2):
        rows = history(out / f"member-{i}.history.csv")
        got = scalars(out / "tensorboard" / f"member-{i}")
        assert [v for _, v in got["epoch/test_errors"]] == [float(r["test_errors"]) for r in rows]
        config = records(out / f"member-{i}.metrics.jsonl")[0]["config"]
        assert (config["member"], config["seed"]) == (i, i)


def test_a_sweep_tracks_one_run_per_setting(cache_path: Path, tmp_path: Path) -> None:
    """Each setting is a run of its own (its own metrics.jsonl and event files); a finished
    sweep asked for again with --log-to trains again the settings that lack the log."""
    require("tensorboard")
    out = tmp_path / "sweep"
    args = [
        "sweep", "--cache", str(cache_path), "-T", "2,8", "--alpha", "0.9", "--student",
        "mlp:16", "--epochs", "1", "--batch-size", "64", "--workers", "0", "--device", "cpu",
        "--out", str(out),
    ]  # fmt: skip
    assert invoke(*args, "--quiet")[0] == 0
    code, output = invoke(*args, "--log-to", "tensorboard")
    assert code == 0, output
    assert "mlp-16-T2-a0.9-s0: its run has no tensorboard log; it will be trained again" in output
    assert "2 settings, 0 already done, 2 to run" in output
    for setting, t in (("mlp-16-T2-a0.9-s0", 2.0), ("mlp-16-T8-a0.9-s0", 8.0)):
        run = out / "runs" / setting
        assert records(run / "metrics.jsonl")[0]["config"]["temperature"] == t
        loss = float(history(run / "history.csv")[0]["loss"])
        assert scalars(run / "tensorboard")["epoch/loss"] == [(1, pytest.approx(loss))]


def test_a_missing_tensorboard_is_one_message_naming_the_extra_before_training(
    cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # importing it raises ImportError
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["train-student", "--cache", str(cache_path), *STUDENT, "--log-to", "tensorboard",
         "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert (
        "--log-to tensorboard needs tensorboard, which is not installed: "
        "pip install 'kd-pipeline[tensorboard]'" in res.output
    )
    assert "Traceback" not in res.output and not out.exists()


def test_an_unknown_tracker_is_refused_with_the_choices(cache_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["train-student", "--cache", str(cache_path), "--log-to", "wandb"]
    )
    assert res.exit_code == 2 and "'wandb' is not" in res.output and "tensorboard" in res.output
