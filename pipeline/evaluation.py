"""``kd-pipeline evaluate``: test metrics of a checkpoint or ensemble directory."""

from __future__ import annotations

from pipeline.checkpoints import fit_problems, load_models
from pipeline.config import EvaluateConfig
from pipeline.datasets import Dataset, load_dataset
from pipeline.devices import resolve_device
from pipeline.errors import KDError
from pipeline.metrics import evaluate_ensemble
from pipeline.sequences.data import is_sequence


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
    if is_sequence(data):
        res = _evaluate_sequences([lm.model for lm in loaded], data, device, cfg.ensemble)
        return {
            "dataset": data.spec,
            "dataset_fingerprint": data.fingerprint,
            "paths": [str(lm.path) for lm in loaded],
            "sequence": True,
            **res,
        }
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


def _evaluate_sequences(models: list, data: Dataset, device: object, method: str) -> dict:
    """Next-token metrics (perplexity, bits per byte, token accuracy) of each member and of
    their combination at T = 1, as ``train-student`` measures sequence students."""
    import torch
    from torch import nn

    from pipeline.ensemble import combine_members
    from pipeline.sequences.models import token_rows
    from pipeline.training.sequence import sequence_metrics

    v = data.num_classes

    class Ensemble(nn.Module):
        """(B, P) ids -> (B, P, V): the members' token logits combined (``--ensemble``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = torch.stack([token_rows(m(x), v) for m in models])
            return combine_members(rows, method, 1.0).reshape(x.shape[0], x.shape[1], v)

    members = [sequence_metrics(m, data, device) for m in models]  # type: ignore[arg-type]
    ensemble = members[0] if len(models) == 1 else sequence_metrics(Ensemble(), data, device)
    return {"members": members, "ensemble": ensemble, "method": method}
