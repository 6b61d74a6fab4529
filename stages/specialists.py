"""``kd-pipeline specialists cluster|train|evaluate|run``: specialist ensembles on a generalist's cache."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import SpecialistsConfig
from pipeline.specialists import Clustering, evaluate_all, fit_clusters, train_all

STEPS = ("cluster", "train", "evaluate")


def run(cfg: SpecialistsConfig, steps: tuple[str, ...] = STEPS, log: Callable[[str], None] = print) -> dict:
    """Run the given steps in order (see ``pipeline.specialists``); returns what each produced, by step name."""
    done: dict = {}
    for step in steps:
        if step == "cluster":
            cl: Clustering = fit_clusters(cfg, log)
            done["cluster"] = cl.to_dict()
        elif step == "train":
            done["train"] = train_all(cfg, log)
        elif step == "evaluate":
            done["evaluate"] = evaluate_all(cfg, log)
    return done
