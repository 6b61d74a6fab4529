"""``TrainConfig``: the options of the one training loop (:func:`pipeline.training.loop.fit`), the
same for every student and teacher (optimiser, schedule, precision, accumulation, clipping, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pipeline.checks import at_least, collect, in_range, positive
from pipeline.errors import ConfigError
from pipeline.options import field_problems, option, parse_clip
from pipeline.training.optim import (
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
)
from pipeline.training.tracking import LOGGERS, check_trackers


def _once(name: str, values: list[str]) -> str | None:
    """A problem when ``values`` repeats one: two TensorBoard writers in one folder would show
    every point twice."""
    twice = sorted({v for v in values if values.count(v) > 1})
    if not twice:
        return None
    return f"{name} names {', '.join(twice)} more than once; give each tracker once"


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training mode.

    The defaults train stably for every T in [1, 20] and alpha in [0, 1]: inputs are normalised
    inside the model, Adam's per-parameter step size does not grow with the T^2-scaled soft
    gradients the way SGD+momentum's does (which diverged at T = 20 in a trial), and gradient-norm
    clipping bounds the first steps.
    """

    epochs: int = option(10, help="Passes over the training data.")
    batch_size: int = option(128, help="Rows per optimiser step.")
    # 10 is far above any rate that trains (Adam's default is 1e-3): a larger one is a typo whose
    # first step would turn every weight into inf.
    lr: float = option(1e-3, most=10.0, help="Peak learning rate.")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="Optimiser (sgd uses --momentum).")
    momentum: float = option(0.9, help="SGD momentum.")
    weight_decay: float = option(0.0, help="L2 weight decay.")
    grad_clip: float | None = option(
        5.0, parse=parse_clip, metavar="FLOAT", help="Clip the gradient norm to this (0 disables)."
    )
    lr_schedule: str = option(
        "cosine", choices=LR_SCHEDULES, help="Learning-rate schedule over all steps."
    )
    warmup_steps: int = option(
        0,
        metavar="N",
        help="Optimiser steps of linear learning-rate warmup from 0, before --lr-schedule.",
    )
    grad_accum: int = option(
        1,
        metavar="N",
        help="Batches whose gradients are added up before each optimiser step (the effective "
        "batch is N x --batch-size).",
    )
    max_steps: int | None = option(
        None,
        metavar="N",
        help="Train for N optimiser steps instead of --epochs (as many epochs as they take, the "
        "last one stopped mid-way; the schedule spans exactly them) [default: --epochs decides].",
    )
    precision: str = option(
        "fp32",
        choices=PRECISIONS,
        help="Autocast of the forward pass: fp32 (none), bf16 (CPU or GPU), fp16 (GPU only, "
        "with loss scaling). The loss and the optimiser stay float32.",
    )
    eval_every: int | None = option(
        None,
        metavar="N",
        help="Also measure (test/validation) every N optimiser steps within an epoch, for long "
        "epochs (logged, and in steps.csv) [default: after each epoch only].",
    )
    seed: int = option(
        0,
        least=0,
        help="Seed for weight initialisation, dropout and shuffling (dataset "
        "subsets take their own seed=).",
    )
    log_to: list[str] = option(
        default_factory=list,
        multiple=True,
        choices=LOGGERS,
        metavar="TRACKER",
        help="Also log the metrics to this tracker (repeatable): tensorboard writes event files "
        "in the run directory's tensorboard/ folder (needs the tensorboard extra). "
        "metrics.jsonl is written either way.",
    )

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every invalid field at once."""
        problems = field_problems(self) + collect(
            at_least("epochs", self.epochs, 1),
            at_least("batch_size", self.batch_size, 1),
            positive("lr", self.lr),
            OPTIMIZERS.problem("optimizer", self.optimizer),
            LR_SCHEDULES.problem("lr_schedule", self.lr_schedule),
            positive("grad_clip", self.grad_clip, optional=True),
            at_least("warmup_steps", self.warmup_steps, 0),
            at_least("grad_accum", self.grad_accum, 1),
            None if self.max_steps is None else at_least("max_steps", self.max_steps, 1),
            None if self.eval_every is None else at_least("eval_every", self.eval_every, 1),
            PRECISIONS.problem("precision", self.precision),
            in_range("momentum", self.momentum, 0, 1),
            at_least("weight_decay", self.weight_decay, 0),
            *(LOGGERS.problem("log_to", name) for name in self.log_to),
            _once("log_to", self.log_to),
        )
        if problems:
            raise ConfigError(problems)
        check_trackers(self.log_to)  # a missing package: refused before anything trains

    def check_device(self, device: torch.device) -> None:
        """Refuse a precision the device cannot run (checked once the device is known).

        Raises:
            ConfigError: fp16 autocast off a GPU (the CPU's autocast is bf16 only).
        """
        if PRECISIONS[self.precision].loss_scaling and device.type != "cuda":
            raise ConfigError(
                [
                    f"--precision fp16 needs a GPU (the device is {device.type}); use bf16 on "
                    "the CPU, or fp32"
                ]
            )

    def to_dict(self) -> dict:
        return asdict(self)
