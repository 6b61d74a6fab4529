"""The tracking callback of the one training loop (pipeline.training.tracking), through ``fit``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import KDError
from pipeline.training.loop import fit
from pipeline.training.losses import DistillationLoss
from pipeline.training.sequence import SequenceLoss
from pipeline.training.sources import InMemorySource
from pipeline.training.train_config import TrainConfig


def _data(n: int = 96, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, c, n)
    teacher = rng.normal(size=(n, c)).astype(np.float32) * 3
    return x, y, teacher


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_token_losses_track_the_training_nll_and_perplexity(tmp_path: Path) -> None:
    """A token student's hard term is its next-token NLL: steps and epochs add train_nll and its
    exp, train_perplexity; a classification loss adds neither."""
    x, y, teacher = _data()
    torch.manual_seed(0)
    for name, loss in (
        ("tokens", SequenceLoss(DistillationLoss(temperature=2.0, alpha=0.5))),
        ("rows", DistillationLoss(temperature=2.0, alpha=0.5)),
    ):
        out = tmp_path / name
        out.mkdir()
        fit(
            torch.nn.Linear(6, 4),
            InMemorySource(x, y, teacher, batch_size=32),
            loss,  # type: ignore[arg-type]
            TrainConfig(epochs=2, batch_size=32),
            torch.device("cpu"),
            history_csv=out / "history.csv",
            progress=False,
        )
        got = _records(out / "metrics.jsonl")
        tracked = [r for r in got if r["record"] in ("step", "epoch")]
        assert len(tracked) == 2 * 3 + 2
        if name == "rows":
            assert not any("train_perplexity" in r for r in tracked)
            continue
        for r in tracked:
            assert r["train_nll"] == r["hard"] > 0
            assert r["train_perplexity"] == pytest.approx(math.exp(r["hard"]))


def test_eval_every_measurements_are_records_at_their_step(tmp_path: Path) -> None:
    x, y, teacher = _data()
    calls = iter(range(100))
    fit(
        torch.nn.Linear(6, 4),
        InMemorySource(x, y, teacher, batch_size=16),
        DistillationLoss(temperature=2.0, alpha=0.5),
        TrainConfig(epochs=1, batch_size=16, eval_every=2),
        torch.device("cpu"),
        evaluate=lambda m: {"test_errors": next(calls)},
        history_csv=tmp_path / "history.csv",
        progress=False,
    )
    got = _records(tmp_path / "metrics.jsonl")
    evals = [r for r in got if r["record"] == "eval"]
    assert [(r["step"], r["test_errors"]) for r in evals] == [(2, 0), (4, 1), (6, 2)]
    # each right after its step's record; the epoch's own measurement last
    kinds = [(r["record"], r.get("step")) for r in got[1:]]
    assert kinds[:3] == [("step", 1), ("step", 2), ("eval", 2)]
    assert got[-1]["record"] == "epoch" and got[-1]["test_errors"] == 3


def test_a_diverged_fit_keeps_the_steps_it_tracked(tmp_path: Path) -> None:
    """Training that fails mid-way (here: a non-finite loss) still leaves its step records: what
    one looks at to see where it went wrong."""
    x, y, teacher = _data()
    x[40] = np.inf  # the second batch's loss is not finite
    with pytest.raises(KDError, match="training diverged in epoch 1"):
        fit(
            torch.nn.Linear(6, 4),
            InMemorySource(x, y, teacher, batch_size=32, shuffle=False),
            DistillationLoss(temperature=2.0, alpha=0.5),
            TrainConfig(epochs=2, batch_size=32, grad_clip=None),
            torch.device("cpu"),
            history_csv=tmp_path / "history.csv",
            progress=False,
        )
    got = _records(tmp_path / "metrics.jsonl")
    assert [r["record"] for r in got] == ["config", "step", "step", "step"]
    assert math.isfinite(got[1]["loss"]) and got[2]["loss"] is None  # JSON has no nan: null
