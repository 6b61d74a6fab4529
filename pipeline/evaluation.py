"""``kd-pipeline evaluate``: test metrics of a checkpoint or ensemble directory."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.checkpoints import fit_problems, load_models
from pipeline.checks import collect
from pipeline.datasets import Dataset, load_dataset
from pipeline.devices import resolve_device
from pipeline.ensemble import ENSEMBLE_METHODS
from pipeline.errors import ConfigError, KDError
from pipeline.metrics import evaluate_ensemble
from pipeline.options import field_problems, option
from pipeline.sequences.data import is_sequence
from pipeline.step_options import data_dir_option, device_option, trust_code_option


@dataclass
class EvaluateConfig:
    """``evaluate``: test metrics of a checkpoint or an ensemble on a labeled dataset."""

    model: str = option(
        "", required=True, exists=True, help="A checkpoint (.pt) or an ensemble directory."
    )
    dataset: str = option("fashion-mnist:test", help="Labeled dataset spec.")
    ensemble: str = option(
        "mean-probs",
        choices=ENSEMBLE_METHODS,
        help="How members are combined: arithmetic (mean-probs) or geometric (mean-logits) mean.",
    )
    batch_size: int = option(1024, help="Rows per forward pass.")
    device: str = device_option()
    data_dir: str | None = data_dir_option()
    trust_code: list[str] = trust_code_option()

    def validate(self) -> None:
        problems = field_problems(self)
        if not self.model:
            problems.append("model (a checkpoint or ensemble directory) must be given")
        problems += collect(ENSEMBLE_METHODS.problem("ensemble", self.ensemble))
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if problems:
            raise ConfigError(problems)


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
