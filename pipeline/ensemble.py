"""Ensembles: combining M members' logits into one set (the paper's two means), a registry.

:data:`ENSEMBLE_METHODS` holds the ways to combine (``mean-probs``, ``mean-logits``);
:func:`combine_members` applies one. Below the losses, the metrics and the loaders, which all
combine members.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError
from pipeline.registry import Registry


def _config_error(message: str) -> ConfigError:
    return ConfigError([message])


@dataclass(frozen=True)
class EnsembleMethod:
    """A registered way to combine members.

    Attributes:
        combine: ``combine(v, T)``: (M, B, C) float32 member logits -> (B, C) logits whose
            softmax at T is the ensemble's distribution.
        into: the same in row blocks, in place: ``into(v, out, T)`` writes (n, C) into ``out``
            (overwriting the scratch block ``v``) and returns the (k,) rows it could not compute
            exactly, which are recombined with ``combine``; None: no blocked form (the streaming
            loader then combines whole shards).
        geometric: a geometric mean, which needs every member's value on every class.
    """

    combine: Callable[[torch.Tensor, float], torch.Tensor]
    into: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
    geometric: bool = False


def _mean_probs(v: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T * log(mean_m softmax(v_m / T))`` (log-sum-exp, stable)."""
    logp = torch.log_softmax(v / temperature, dim=-1)  # (M, B, C)
    return temperature * (torch.logsumexp(logp, dim=0) - math.log(v.shape[0]))


# Below this a float32 probability has lost precision (a subnormal) or underflowed to 0.
_TINY = float(torch.finfo(torch.float32).tiny)


def _mean_probs_into(v: torch.Tensor, out: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T * log(mean_m softmax(v_m / T))`` into ``out``, overwriting ``v``.

    Args:
        v: (M, n, C) float32 raw logits of M members (a scratch block: it is overwritten).
        out: (n, C) float32.

    Returns:
        (k,) int64 the rows of ``out`` that are not exact here (a class's mean probability below
        float32's smallest normal number) and must be recombined in log space.
    """
    members = v.shape[0]
    v.mul_(1.0 / temperature)
    # Each member's probabilities from its own row maximum: exp of values <= 0, so none
    # overflows; classes far below the top may underflow, which the check below catches.
    v.sub_(v.amax(dim=2, keepdim=True)).exp_()
    inv = v.sum(dim=2, keepdim=True).reciprocal_()  # (M, n, 1): 1 / each member's partition sum
    torch.mul(v[0], inv[0], out=out)
    for k in range(1, members):
        out.addcmul_(v[k], inv[k])  # the sum of the members' probabilities
    low = (out.amin(dim=1) < _TINY * members).nonzero().flatten()
    out.log_().sub_(math.log(members)).mul_(temperature)
    return low


def _mean_logits(v: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean_m v_m`` (independent of T)."""
    return v.mean(dim=0)


def _mean_logits_into(v: torch.Tensor, out: torch.Tensor, temperature: float) -> torch.Tensor:
    torch.mean(v, dim=0, out=out)
    return torch.empty(0, dtype=torch.int64)  # every row exact


#: Ensemble method names -> :class:`EnsembleMethod` (see :func:`combine_members`); plug-ins from
#: the entry point group ``kd_pipeline.ensemble_methods``.
ENSEMBLE_METHODS: Registry[EnsembleMethod] = Registry(
    "ensemble_methods", "ensemble method", _config_error
)
ENSEMBLE_METHODS.register(
    "mean-probs",
    "the arithmetic mean of the members' probabilities",
    EnsembleMethod(_mean_probs, _mean_probs_into),
)
ENSEMBLE_METHODS.register(
    "mean-logits",
    "the mean of the logits (a renormalised geometric mean)",
    EnsembleMethod(_mean_logits, _mean_logits_into, geometric=True),
)


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
    return ENSEMBLE_METHODS.get(method).combine(member_logits.float(), temperature)
