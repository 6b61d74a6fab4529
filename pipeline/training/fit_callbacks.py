"""The callbacks every fit uses (:class:`pipeline.training.callbacks.Callback`): measuring after
each epoch (:class:`Evaluation`), model selection (:class:`BestEpoch`, :class:`KeepBest`), the
history file (:class:`HistoryFile`, :func:`write_history_csv`) and the epoch line
(:class:`EpochLog`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.files import atomic_write
from pipeline.training.callbacks import Callback, FitState


class BestEpoch:
    """Keeps the weights of the epoch with the best validation score (model selection).

    The fair protocol of ``reproduce main-table``: every student, baseline or distilled, trains
    for the same epochs and is then measured with the weights of its own best epoch on a
    validation split carved from the training set, so an early-overfitting baseline is not
    penalised for a schedule chosen for the distilled student, and the test set chooses nothing.

    Args:
        key: the epoch row's value to minimise (e.g. ``val_errors``).
        tie: the value that breaks ties on ``key`` (e.g. ``val_nll``); earlier epochs win ties on
            both.
    """

    def __init__(self, key: str = "val_errors", tie: str = "val_nll") -> None:
        self.key, self.tie = key, tie
        self.epoch: int | None = None
        self.row: dict | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def offer(self, model: nn.Module, row: dict) -> bool:
        """Keep a copy of ``model``'s weights (on the CPU) if ``row`` scores best so far."""
        score = (row[self.key], row.get(self.tie, 0.0))
        if self.row is not None and score >= (self.row[self.key], self.row.get(self.tie, 0.0)):
            return False
        self.epoch, self.row = int(row["epoch"]), dict(row)
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the kept weights into ``model`` (nothing was offered: leave it as it is)."""
        if self._state is not None:
            model.load_state_dict(self._state)

    def record(self, epochs: int) -> dict:
        """What a run records about the choice: ``by``, ``epoch`` and the chosen row's values."""
        assert self.row is not None, "no epoch was offered"
        chosen = {k: v for k, v in self.row.items() if k.startswith("val_") or k == "epoch"}
        return {"by": f"{self.key}, then {self.tie}", "epochs_trained": epochs, **chosen}


class Evaluation(Callback):
    """Measures the model after each epoch (its dict merged into the epoch row) and, with
    ``every``, every N optimiser steps within epochs (those rows kept in ``steps`` and logged).

    Args:
        fn: model (in eval mode) -> measurements.
        every: steps between mid-epoch measurements, or None.
        log: receives a line per mid-epoch measurement.
    """

    def __init__(
        self,
        fn: Callable[[nn.Module], dict],
        every: int | None = None,
        log: Callable[[str], None] | None = None,
        steps_csv: str | Path | None = None,
    ) -> None:
        self.fn, self.every, self.log, self.steps_csv = fn, every, log, steps_csv
        self.steps: list[dict] = []

    def _measure(self, model: nn.Module) -> dict:
        was = model.training
        model.eval()
        try:
            return self.fn(model)
        finally:
            model.train(was)

    def on_step_end(self, state: FitState) -> None:
        if self.every and state.step % self.every == 0:
            row = {"epoch": state.epoch, "step": state.step, **self._measure(state.model)}
            self.steps.append(row)
            state.step_eval = row  # for the callbacks after this one (tracking)
            if self.steps_csv is not None:
                write_history_csv(self.steps_csv, self.steps)
            if self.log is not None and len(row) > 2:
                shown = " ".join(
                    f"{k}={_short(v)}" for k, v in row.items() if k not in ("epoch", "step")
                )
                self.log(f"{state.desc} epoch {state.epoch} step {state.step}: {shown}")

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        row.update(self._measure(state.model))


class KeepBest(Callback):
    """Model selection: offers every epoch row to a :class:`BestEpoch` (rows get ``selected``) and
    restores the chosen epoch's weights at the end."""

    def __init__(self, best: BestEpoch) -> None:
        self.best = best

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        if self.best.key in row:
            row["selected"] = self.best.offer(state.model, row)

    def on_fit_end(self, state: FitState) -> None:
        self.best.restore(state.model)


class HistoryFile(Callback):
    """Rewrites the epoch rows to a CSV after every epoch (atomically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        write_history_csv(self.path, [*state.history, row])


class EpochLog(Callback):
    """One summary line per epoch."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        extra = "".join(
            f" {k}={_short(row[k])}"
            for k in ("val_errors", "val_perplexity", "test_errors", "test_perplexity")
            if k in row
        )
        steps = f" step {state.step}/{state.total_steps}" if state.cfg.max_steps else ""
        self.log(
            f"{state.desc} epoch {row['epoch']}/{state.epochs}{steps}: loss={row['loss']:.4f} "
            f"soft={row['soft']:.4f} hard={row['hard']:.4f} "
            f"train_errors={row['train_errors']}{extra} ({row['seconds']:.1f}s)"
        )


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_history_csv(path: str | Path, history: list[dict]) -> None:
    """Write per-epoch rows as CSV (columns: the union of keys, in first-seen order)."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys and not isinstance(row[k], (list, dict))]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    # Rewritten after every epoch: atomically, so a reader (or a kill) never leaves half a history.
    atomic_write(path, write)
