"""Optimisers, learning-rate schedules and autocast precisions: registries, and building the
optimiser and schedule from a config.

An optimiser entry names its ``torch.optim`` class and the config fields it takes beyond
``lr`` and ``weight_decay`` (SGD's ``momentum``), so a new optimiser is one entry. A schedule
entry is the factor on the peak learning rate after warmup, as a function of the step and the
number of steps it spans (None: the peak rate throughout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.registry import Registry


def _config_error(message: str) -> ConfigError:
    return ConfigError([message])


@dataclass(frozen=True)
class Optimizer:
    """A registered optimiser: the ``torch.optim`` class name and its extra config fields."""

    torch_name: str
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schedule:
    """A registered schedule: ``factor(step, steps)`` on the peak rate for ``step`` in
    ``[0, steps]`` after warmup; None keeps the peak rate (no scheduler at all without warmup)."""

    factor: Callable[[int, int], float] | None


#: Optimiser names -> :class:`Optimizer`; plug-ins from the entry point group
#: ``kd_pipeline.optimizers``.
OPTIMIZERS: Registry[Optimizer] = Registry("optimizers", "optimizer", _config_error)
OPTIMIZERS.register("adam", "torch.optim.Adam", Optimizer("Adam"))
OPTIMIZERS.register("adamw", "torch.optim.AdamW (decoupled weight decay)", Optimizer("AdamW"))
OPTIMIZERS.register("sgd", "torch.optim.SGD with --momentum", Optimizer("SGD", ("momentum",)))

#: Learning-rate schedule names -> :class:`Schedule`; plug-ins from ``kd_pipeline.lr_schedules``.
LR_SCHEDULES: Registry[Schedule] = Registry("lr_schedules", "lr schedule", _config_error)
LR_SCHEDULES.register(
    "cosine",
    "cosine decay from the peak rate to 0 at the last step",
    Schedule(lambda step, steps: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))),
)
LR_SCHEDULES.register("constant", "the peak rate throughout", Schedule(None))


@dataclass(frozen=True)
class Precision:
    """A registered autocast precision: the ``torch`` dtype the forward pass autocasts to (None:
    no autocast) and whether the loss is scaled (fp16, whose autocast only CUDA runs)."""

    autocast: str | None
    loss_scaling: bool = False


#: ``--precision`` names -> :class:`Precision`.
PRECISIONS: Registry[Precision] = Registry("precisions", "precision", _config_error)
PRECISIONS.register("fp32", "no autocast", Precision(None))
PRECISIONS.register("bf16", "bfloat16 autocast (CPU or GPU)", Precision("bfloat16"))
PRECISIONS.register(
    "fp16", "float16 autocast with loss scaling (GPU only)", Precision("float16", True)
)


def make_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names over the model's trainable parameters.

    Args:
        cfg: a ``TrainConfig`` (``optimizer``, ``lr``, ``weight_decay`` and the entry's fields).
    """
    entry = OPTIMIZERS.get(cfg.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    extra = {name: getattr(cfg, name) for name in entry.fields}
    make = getattr(torch.optim, entry.torch_name)
    return make(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def make_schedule(
    opt: torch.optim.Optimizer, cfg: Any, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Linear warmup over ``cfg.warmup_steps`` from 0, then ``cfg.lr_schedule`` (cosine decays to
    0 at ``total_steps``; constant holds the peak); None when neither changes the rate."""
    warm = cfg.warmup_steps
    after = LR_SCHEDULES.get(cfg.lr_schedule).factor
    if after is None and not warm:
        return None
    decay = max(1, total_steps - warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 1.0 if after is None else after(step - warm, decay)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
