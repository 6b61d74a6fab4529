"""What the training loop shares with the code around it: :class:`FitState` and :class:`Callback`.

Apart from :mod:`pipeline.training.fit_callbacks` (which defines the callbacks every fit uses:
measuring, model selection, the history file, the epoch line) so that other modules can add
callbacks (:mod:`pipeline.training.tracking`: metrics as JSON lines, TensorBoard) and the loop can
use theirs without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class FitState:
    """What :func:`~pipeline.training.loop.fit` shares with its callbacks while it trains.

    Attributes:
        model: the plain module being trained (not the DDP wrapper); ``epochs``: the planned
        passes; ``epoch``: the current one (1-based once it started); ``step``: optimiser steps
        so far; ``total_steps``: what the schedule spans; ``history``: the epoch rows so far;
        ``stop``: set by a callback (or ``--max-steps``) to end training after this step.
        ``step_values``: during ``on_step_end``, the step's ``loss``, ``soft``, ``hard`` (means
        over its rows) and ``train_errors`` as 0-d tensors on the device (a callback that reads
        them pays the device sync, when it chooses: see ``tracking``); ``step_lr``: the learning
        rate the step used; ``step_eval``: a mid-epoch measurement taken at this step
        (``--eval-every``), else None.
    """

    model: nn.Module
    cfg: Any  # the fit's TrainConfig (not imported: the loop imports this module)
    desc: str
    epochs: int
    total_steps: int
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    stop: bool = False
    step_values: dict[str, torch.Tensor] = field(default_factory=dict)
    step_lr: float = 0.0
    step_eval: dict | None = None


class Callback:
    """Something :func:`~pipeline.training.loop.fit` calls as it trains; each hook is optional.
    The model is in eval mode during ``on_evaluate`` / ``on_epoch_end`` hooks that measure
    (``Evaluation`` sets it)."""

    def on_step_end(self, state: FitState) -> None:
        """After each optimiser step (``state.step`` counts them)."""

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        """After each epoch with its row (callbacks may add keys; later ones see them)."""

    def on_fit_end(self, state: FitState) -> None:
        """Once, after the last step."""

    def on_fit_error(self, state: FitState) -> None:
        """Once, when training stopped with an exception (diverged, interrupted), before it
        propagates: keep what is worth keeping (the tracking writes the steps so far)."""
