"""The small-data experiment: hard vs soft targets on a small share of the training set."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.experiments.reproduce.artefacts import Run, read_history, student_metrics
from pipeline.experiments.reproduce.sections import Section, pct


# ------------------------------------------------------------------------------------- small data
@dataclass(kw_only=True)
class SmallData(Section):
    """Hard vs soft targets on a small share of the training set.

    ``rows`` holds one dict per student (as ``reproduce.json`` records it); ``curves`` its test
    error rate per epoch, ``{label: (epochs, rates)}``.
    """

    spec: str
    rows_used: int
    epochs: int
    full_spec: str
    full_rows: int
    full_accuracy: float
    rows: list[dict]
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def figures(self) -> dict:
        return {"rows": self.rows, "all_data_accuracy": self.full_accuracy}


def small_data(run: Run) -> SmallData:
    """A small share of the training set: hard targets vs the all-data teacher's soft targets."""
    s = run.scale
    spec = run.spec(fraction=s.small_fraction)
    cache = run.cache(spec)
    hard = run.student("small-data/hard", cache, 1.0, 0.0, epochs=s.small_epochs)
    soft = run.student(
        f"small-data/soft-T{run.cfg.temperature:g}",
        cache,
        run.cfg.temperature,
        1.0,
        epochs=s.small_epochs,
    )
    full = run.student("small-data/all-data", run.cache(run.spec()), 1.0, 0.0)
    rows, curves = [], {}
    for label, r in (("hard targets", hard), ("soft targets (alpha = 1)", soft)):
        hist = read_history(Path(r["config"]["out"]) / "history.csv")
        train_acc = student_metrics(run, r, spec)["accuracy"]
        test = [int(h["test_errors"]) for h in hist]
        n = r["metrics"]["test"]["n"]
        rows.append(
            {
                "model": label,
                "train_accuracy": train_acc,
                "test_accuracy": r["metrics"]["test"]["accuracy"],
                "best_epoch_test_accuracy": 1 - min(test) / n,
                "best_epoch": int(np.argmin(test)) + 1,
                # The last epoch more than 2 % worse than the best one.
                "early_stopping_needed": test[-1] > min(test) * 1.02,
            }
        )
        curves[label] = ([int(h["epoch"]) for h in hist], [t / n for t in test])
    holds = rows[1]["test_accuracy"] > rows[0]["test_accuracy"]
    return SmallData(
        name="small-data",
        holds=holds,
        verdict=(
            f"holds: soft targets {pct(rows[1]['test_accuracy'])} vs hard "
            f"{pct(rows[0]['test_accuracy'])} test accuracy"
            if holds
            else "does not hold here: hard targets did as well"
        ),
        spec=spec,
        rows_used=hard["cache"]["rows_used"],
        epochs=s.small_epochs,
        full_spec=run.spec(),
        full_rows=full["cache"]["rows_used"],
        full_accuracy=full["metrics"]["test"]["accuracy"],
        rows=rows,
        curves=curves,
    )
