"""Ensembles: combining M members' logits into one set (the paper's two means), a registry.

:data:`ENSEMBLE_METHODS` holds the ways to combine (``mean-probs``, ``mean-logits``);
:func:`combine_members` applies one. Below the losses, the metrics and the loaders, which all
combine members.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipeline.errors import ConfigError
from pipeline.registry import Registry


def _config_error(message: str) -> ConfigError:
    return ConfigError([message])


#: Ensemble method names -> ``combine(v, T)``: (M, B, C) float32 member logits -> (B, C) logits
#: (see :func:`combine_members`); plug-ins from ``kd_pipeline.ensemble_methods``.
ENSEMBLE_METHODS: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry(
    "ensemble_methods", "ensemble method", _config_error
)


@ENSEMBLE_METHODS.register("mean-probs", "the arithmetic mean of the members' probabilities")
def _mean_probs(v: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T * log(mean_m softmax(v_m / T))`` (log-sum-exp, stable)."""
    logp = torch.log_softmax(v / temperature, dim=-1)  # (M, B, C)
    return temperature * (torch.logsumexp(logp, dim=0) - math.log(v.shape[0]))


@ENSEMBLE_METHODS.register("mean-logits", "the mean of the logits (a renormalised geometric mean)")
def _mean_logits(v: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean_m v_m`` (independent of T)."""
    return v.mean(dim=0)


def combine_members(
    member_logits: torch.Tensor, method: str = "mean-probs", temperature: float = 1.0
) -> torch.Tensor:
    """Combine an ensemble's logits into one set of logits.

    The result ``v`` is such that ``softmax(v / T)`` is the ensemble's distribution at temperature
    T:

    - ``mean-probs``: the arithmetic mean of the members' ``softmax(v_m / T)``;
      ``v = T * log(mean_m softmax(v_m / T))`` (log-sum-exp, stable).
    - ``mean-logits``: the geometric mean of the members' distributions, renormalised, which is
      ``softmax(mean_m v_m / T)``; ``v = mean_m v_m`` (independent of T).

    Args:
        member_logits: (M, B, C) raw logits of M members.
        method: a name in :data:`ENSEMBLE_METHODS` (``mean-probs`` or ``mean-logits``).
        temperature: T used for ``mean-probs``.

    Returns:
        (B, C) float32 logits.
    """
    return ENSEMBLE_METHODS.get(method)(member_logits.float(), temperature)
