"""``kd-pipeline evaluate``: test metrics of a checkpoint or ensemble directory."""

from __future__ import annotations

from pipeline.checkpoints import fit_problems, load_models
from pipeline.config import EvaluateConfig
from pipeline.datasets import load_dataset
from pipeline.devices import resolve_device
from pipeline.errors import KDError
from pipeline.metrics import evaluate_ensemble


def evaluate_models(cfg: EvaluateConfig) -> dict:
    """Evaluate each member and their combination; returns
    ``{"members", "ensemble", "dataset", ...}``.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    loaded = load_models([cfg.model], device, cfg.trust_code)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if not data.labeled:
        raise KDError(
            f"{data.spec} has no labels; evaluate needs a labeled dataset such as "
            "fashion-mnist:test"
        )
    problems = fit_problems(loaded, data)
    if problems:
        raise KDError("; ".join(problems))
    res = evaluate_ensemble(
        [lm.model for lm in loaded],
        data.x,
        data.y,
        device,
        data.num_classes,
        cfg.ensemble,
        cfg.batch_size,
    )
    return {
        "dataset": data.spec,
        "dataset_fingerprint": data.fingerprint,
        "paths": [str(lm.path) for lm in loaded],
        **res,
    }
