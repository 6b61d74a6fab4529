"""The one training loop.

Teacher training, student distillation from the cache and online distillation all run :func:`fit`;
they differ only in the batch source (what yields ``(x, teacher_logits | None, labels | None)``), an
optional ``teacher_fn`` (online KD: soft targets from a live forward pass) and the loss (a registry
entry). No mode has a loop of its own.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.checks import at_least, collect, in_range, positive
from pipeline.data.lazy import is_lazy
from pipeline.distributed import SINGLE, Ranks, all_sum, batch_spans, training_seed
from pipeline.errors import ConfigError, KDError
from pipeline.files import atomic_write
from pipeline.options import field_problems, option, parse_clip
from pipeline.progress import progress_bar, progress_lines
from pipeline.training.callbacks import Callback, FitState
from pipeline.training.losses import DistillationLoss
from pipeline.training.optim import (
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    make_optimizer,
    make_schedule,
)
from pipeline.training.targets import flat_rows
from pipeline.training.tracking import LOGGERS, check_trackers, tracking_hooks

# A batch: raw inputs (B, *shape), teacher logits (B, C) or None, labels (B,) or None.
Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


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


class InMemorySource:
    """Shuffled mini-batches over arrays held in memory (every row exactly once per epoch).

    Args:
        x: (N, *shape) raw inputs.
        y: (N,) labels or None.
        teacher: (N, C) teacher logits (already combined over members) or None.
        batch_size: rows per batch.
        seed: the epoch-e permutation is drawn from the seed sequence ``[seed, e]``: reproducible,
            and distinct streams for different seeds (seed s, epoch e+1 never repeats seed s+1,
            epoch e).
        rank: ``(k, K)``: serve rank k's part of every global batch of ``K * batch_size`` rows of
            the same permutation (``pipeline.distributed.batch_spans``); ``(0, 1)``: all rows.
    """

    def __init__(
        self,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor | None,
        teacher: np.ndarray | torch.Tensor | None = None,
        batch_size: int = 128,
        seed: int = 0,
        shuffle: bool = True,
        rank: tuple[int, int] = (0, 1),
    ) -> None:
        # Rows as a list of arrays, or a lazy dataset's inputs (a sequence of rows to torch):
        # one stacked array, not torch's slow (and warning) element-wise conversion.
        if isinstance(x, list | tuple):
            x = np.stack(x)
        elif is_lazy(x):
            x = x[:]  # decoded in one read (through its loader), not row by row
        self.x = torch.as_tensor(x)
        self.y = None if y is None else torch.as_tensor(y).long()
        # Dense (N, C) logits become a tensor; sparse targets (pipeline.training.targets) index
        # the same way and are kept as they are.
        self.teacher = (
            teacher if teacher is None or hasattr(teacher, "to") else torch.as_tensor(teacher)
        )
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        # Every rank's steps (each a span of the epoch's order); None on one process.
        self.spans = (
            None
            if rank[1] == 1
            else batch_spans(int(self.x.shape[0]), batch_size, rank[0], rank[1])
        )

    def __len__(self) -> int:
        if self.spans is not None:
            return len(self.spans)
        return math.ceil(self.x.shape[0] / self.batch_size)

    @property
    def num_rows(self) -> int:
        return int(self.x.shape[0])

    def epoch(self, epoch: int, with_rows: bool = False) -> Iterator[Batch]:
        """Yield the epoch's batches; ``with_rows`` adds each batch's row positions (B,)."""
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(n))
        else:
            order = torch.arange(n)
        spans = self.spans or [(s, s + self.batch_size) for s in range(0, n, self.batch_size)]
        for start, stop in spans:
            idx = order[start:stop]
            batch = (
                self.x[idx],
                None if self.teacher is None else self.teacher[idx],
                None if self.y is None else self.y[idx],
            )
            yield (*batch, idx.numpy()) if with_rows else batch


def random_shift(
    x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by its own random integer offset in [-max_shift, max_shift] (zero fill).

    The paper's "jitter" for its MNIST teacher.

    Args:
        x: (B, C, H, W) images.
        max_shift: largest shift in pixels along each axis.

    Returns:
        (B, C, H, W) shifted images, same dtype.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s))
    dy = torch.randint(-s, s + 1, (b,), generator=generator)
    dx = torch.randint(-s, s + 1, (b,), generator=generator)
    out = torch.empty_like(x)
    # One slice per distinct offset ((2s+1)^2 groups): far cheaper than a per-pixel gather.
    key = ((dy + s) * (2 * s + 1) + (dx + s)).to(x.device)
    for k in torch.unique(key).tolist():
        oy, ox = divmod(
            int(k), 2 * s + 1
        )  # offsets into the padded image: oy = s - dy shifts content down
        sel = (key == k).nonzero(as_tuple=True)[0]
        out[sel] = padded[sel, :, 2 * s - oy : 2 * s - oy + h, 2 * s - ox : 2 * s - ox + w]
    return out


class BestEpoch:
    """Keeps the weights of the epoch with the best validation score (model selection).

    The fair protocol of ``reproduce main-table``: every student, baseline or distilled, trains
    for the same epochs and is then measured with the weights of its own best epoch on a
    validation split carved from the training set, so an early-overfitting baseline is not
    penalised for a schedule chosen for the distilled student, and the test set chooses nothing.

    Args:
        key: the epoch row's value to minimise (e.g. ``val_errors``).
        tie: the value that breaks ties on ``key`` (e.g. ``val_nll``); earlier epochs win ties on
            both.
    """

    def __init__(self, key: str = "val_errors", tie: str = "val_nll") -> None:
        self.key, self.tie = key, tie
        self.epoch: int | None = None
        self.row: dict | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def offer(self, model: nn.Module, row: dict) -> bool:
        """Keep a copy of ``model``'s weights (on the CPU) if ``row`` scores best so far."""
        score = (row[self.key], row.get(self.tie, 0.0))
        if self.row is not None and score >= (self.row[self.key], self.row.get(self.tie, 0.0)):
            return False
        self.epoch, self.row = int(row["epoch"]), dict(row)
        self._state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the kept weights into ``model`` (nothing was offered: leave it as it is)."""
        if self._state is not None:
            model.load_state_dict(self._state)

    def record(self, epochs: int) -> dict:
        """What a run records about the choice: ``by``, ``epoch`` and the chosen row's values."""
        assert self.row is not None, "no epoch was offered"
        chosen = {k: v for k, v in self.row.items() if k.startswith("val_") or k == "epoch"}
        return {"by": f"{self.key}, then {self.tie}", "epochs_trained": epochs, **chosen}


class BatchSource:
    """What :func:`fit` consumes: ``epoch(e)`` yields batches; ``len()`` is batches per epoch (for
    the bar)."""

    def epoch(self, epoch: int) -> Iterable[Batch]:  # pragma: no cover - protocol
        raise NotImplementedError


class Evaluation(Callback):
    """Measures the model after each epoch (its dict merged into the epoch row) and, with
    ``every``, every N optimiser steps within epochs (those rows kept in ``steps`` and logged).

    Args:
        fn: model (in eval mode) -> measurements.
        every: steps between mid-epoch measurements, or None.
        log: receives a line per mid-epoch measurement.
    """

    def __init__(
        self,
        fn: Callable[[nn.Module], dict],
        every: int | None = None,
        log: Callable[[str], None] | None = None,
        steps_csv: str | Path | None = None,
    ) -> None:
        self.fn, self.every, self.log, self.steps_csv = fn, every, log, steps_csv
        self.steps: list[dict] = []

    def _measure(self, model: nn.Module) -> dict:
        was = model.training
        model.eval()
        try:
            return self.fn(model)
        finally:
            model.train(was)

    def on_step_end(self, state: FitState) -> None:
        if self.every and state.step % self.every == 0:
            row = {"epoch": state.epoch, "step": state.step, **self._measure(state.model)}
            self.steps.append(row)
            state.step_eval = row  # for the callbacks after this one (tracking)
            if self.steps_csv is not None:
                write_history_csv(self.steps_csv, self.steps)
            if self.log is not None and len(row) > 2:
                shown = " ".join(
                    f"{k}={_short(v)}" for k, v in row.items() if k not in ("epoch", "step")
                )
                self.log(f"{state.desc} epoch {state.epoch} step {state.step}: {shown}")

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        row.update(self._measure(state.model))


class KeepBest(Callback):
    """Model selection: offers every epoch row to a :class:`BestEpoch` (rows get ``selected``) and
    restores the chosen epoch's weights at the end."""

    def __init__(self, best: BestEpoch) -> None:
        self.best = best

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        if self.best.key in row:
            row["selected"] = self.best.offer(state.model, row)

    def on_fit_end(self, state: FitState) -> None:
        self.best.restore(state.model)


class HistoryFile(Callback):
    """Rewrites the epoch rows to a CSV after every epoch (atomically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        write_history_csv(self.path, [*state.history, row])


class EpochLog(Callback):
    """One summary line per epoch."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def on_epoch_end(self, state: FitState, row: dict) -> None:
        extra = "".join(
            f" {k}={_short(row[k])}"
            for k in ("val_errors", "val_perplexity", "test_errors", "test_perplexity")
            if k in row
        )
        steps = f" step {state.step}/{state.total_steps}" if state.cfg.max_steps else ""
        self.log(
            f"{state.desc} epoch {row['epoch']}/{state.epochs}{steps}: loss={row['loss']:.4f} "
            f"soft={row['soft']:.4f} hard={row['hard']:.4f} "
            f"train_errors={row['train_errors']}{extra} ({row['seconds']:.1f}s)"
        )


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fit(
    model: nn.Module,
    source: InMemorySource | BatchSource,
    loss_fn: DistillationLoss,
    cfg: TrainConfig,
    device: torch.device,
    *,
    teacher_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    history_csv: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    ranks: Ranks = SINGLE,
    keep_best: BestEpoch | None = None,
    callbacks: Sequence[Callback] = (),
    config: dict | None = None,
) -> list[dict]:
    """Train ``model`` in place; return one dict per epoch.

    The loop itself only trains: what happens around it (measuring, logging, the history file,
    keeping the best epoch) are :class:`Callback` objects, in this order: ``evaluate``
    (:class:`Evaluation`, also every ``cfg.eval_every`` steps), ``keep_best`` (:class:`KeepBest`),
    ``callbacks``, with ``history_csv`` the tracking (``metrics.jsonl`` and ``cfg.log_to``:
    :mod:`pipeline.training.tracking`) and :class:`HistoryFile`, ``log`` (:class:`EpochLog`).

    Args:
        model: maps raw inputs (B, *shape) to logits (B, C); already on ``device``.
        source: yields ``(x, teacher_logits | None, labels | None)`` per batch, every row once per
            epoch (targets and labels may be grouped per sample, (B, P, ...): they are
            flattened to rows).
        loss_fn: ``loss_fn(student_logits, teacher_logits, labels) -> {"loss", "soft", "hard"}``.
        cfg: optimisation settings: ``grad_accum`` batches per optimiser step, ``warmup_steps``
            and ``lr_schedule`` over the steps, ``max_steps`` (stop mid-epoch), ``precision``
            (autocast of the forward pass; fp16 with a gradient scaler), ``grad_clip``.
        device: where to train.
        teacher_fn: online distillation: raw inputs (B, *shape) on ``device`` -> teacher logits
            (B, C), used when the source gives none (applied to the same augmented inputs the
            student sees).
        augment: train-time transform of raw inputs on ``device`` (e.g. jitter).
        evaluate: model (in eval mode) -> measurements merged into each epoch row (e.g.
            ``test_errors``); with ``cfg.eval_every`` also every N steps (logged, and written to
            ``steps.csv`` beside ``history_csv``).
        history_csv: if given, the per-epoch rows are written there (rewritten after every epoch),
            and the step and epoch metrics beside it as JSON lines (``metrics.jsonl``), and to
            the trackers of ``cfg.log_to`` (TensorBoard) in the same directory.
        log: receives one summary line per epoch.
        desc: progress-bar label.
        progress: show a progress bar per epoch on a terminal; elsewhere (a log file), a line
            through ``log`` every :data:`~pipeline.progress.LINE_SECONDS` of a long epoch.
        ranks: this process's place in a torchrun job. With more than one rank the model is
            trained through ``DistributedDataParallel`` (gradients averaged over the ranks; the
            ``model`` passed in stays the plain module and holds the trained weights), each rank
            iterates its share of every epoch (``source`` must serve the same number of batches
            on every rank), and the epoch's sums are added over the ranks. ``evaluate``,
            ``history_csv`` and ``log`` are the caller's to give to rank 0 only.
        keep_best: model selection: offered every epoch's row after ``evaluate`` (which must
            return its key), and at the end ``model`` holds the chosen epoch's weights; each row
            gets ``selected`` (True when it was the best so far).
        callbacks: more :class:`Callback` objects.
        config: the resolved config the tracking records once (default: ``cfg``'s fields).

    Returns:
        Per-epoch rows: ``epoch``, ``loss``, ``soft``, ``hard`` (means over rows), ``train_errors``,
        ``train_error_rate``, ``lr``, ``seconds``, ``steps``, plus what callbacks added.
    """
    cfg.validate()
    cfg.check_device(device)
    torch.manual_seed(training_seed(cfg.seed, ranks))
    net = model
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # DDP copies rank 0's weights to the other ranks here and averages gradients in backward.
        net = DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
    opt = make_optimizer(model, cfg)
    per_epoch = max(1, math.ceil(len(source) / cfg.grad_accum))
    epochs = cfg.epochs
    total_steps = epochs * per_epoch
    if cfg.max_steps is not None:  # a step budget replaces the epochs: as many as it takes
        total_steps = cfg.max_steps
        epochs = math.ceil(total_steps / per_epoch)
    sched = make_schedule(opt, cfg, total_steps)
    hooks: list[Callback] = []
    if evaluate is not None:
        steps_csv = None
        if history_csv is not None and cfg.eval_every:
            # beside the epoch history, named like it (a teacher's members each have their own)
            name = Path(history_csv).name
            steps_csv = Path(history_csv).with_name(
                name.replace("history", "steps") if "history" in name else f"steps-{name}"
            )
        hooks.append(Evaluation(evaluate, cfg.eval_every, log, steps_csv))
    if keep_best is not None:
        hooks.append(KeepBest(keep_best))
    hooks += list(callbacks)
    if history_csv is not None:
        # The loss's hard term is a token student's next-token NLL: tracked as its perplexity too.
        token_nll = bool(getattr(loss_fn, "measures_nll", False))
        hooks += tracking_hooks(
            history_csv, cfg.log_to, cfg.to_dict() if config is None else config, token_nll
        )
        hooks.append(HistoryFile(history_csv))
    if log is not None:
        hooks.append(EpochLog(log))
    state = FitState(model, cfg, desc, epochs, total_steps)
    step = _Stepper(net, model, opt, sched, cfg, device, ranks)
    try:
        for epoch in range(epochs):
            state.epoch = epoch + 1
            model.train()
            t0 = time.perf_counter()
            bar = progress_bar(
                source.epoch(epoch),
                total=len(source),
                enabled=progress,
                log=None,  # no bar: the epoch's own lines below count batches and rows
                desc=f"{desc} epoch {epoch + 1}/{epochs}",
                leave=False,
                unit="batch",
            )
            sums = _Sums(device)
            # Redirected into a log, a long epoch says how far it is every LINE_SECONDS instead.
            lines = progress_lines(
                len(source), f"{desc} epoch {epoch + 1}/{epochs}", log, enabled=progress, bar=bar
            )
            batches = iter(bar)
            n = len(source)
            for i, (xb, tb, yb) in enumerate(batches):
                xb = xb.to(device, non_blocking=step.non_blocking)
                # A sample of several rows (a sequence's positions) comes with its targets and
                # labels grouped per sample, (B, P, ...): the losses take one row per position.
                nb = step.non_blocking
                tb = flat_rows(None if tb is None else tb.to(device, non_blocking=nb))
                yb = None if yb is None else yb.to(device, non_blocking=nb).reshape(-1)
                if augment is not None:
                    xb = augment(xb)
                if tb is None and teacher_fn is not None:
                    with torch.inference_mode():
                        tb = teacher_fn(xb)
                    tb = tb.clone()  # leave inference mode: autograd may touch it in the loss
                # The last batches of an epoch may be fewer than grad_accum: they still make a step,
                # each weighted by the group it is in (a mean over the group's batches).
                first = i - i % cfg.grad_accum
                group = min(cfg.grad_accum, n - first)
                last = i + 1 == first + group
                logits, parts = step.forward_backward(xb, tb, yb, loss_fn, last, group)
                sums.add(parts, logits, yb, xb.shape[0])
                if lines is not None:
                    lines.update(xb.shape[0])
                if last:
                    state.step_lr = opt.param_groups[0]["lr"]  # the rate this step uses
                    step.update()
                    state.step += 1
                    state.step_values, state.step_eval = sums.take_step(), None
                    for h in hooks:
                        h.on_step_end(state)
                    if cfg.max_steps is not None and state.step >= cfg.max_steps:
                        state.stop = True
                    if state.stop:
                        break
            if hasattr(bar, "close"):
                bar.close()
            row = sums.row(ranks, device, epoch + 1)
            if not math.isfinite(row["loss"]):
                raise KDError(
                    f"training diverged in epoch {epoch + 1}: the loss is {row['loss']}; lower "
                    "--lr, keep the default --optimizer adam and --grad-clip, or check the inputs"
                )
            row.update(lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
            row["steps"] = state.step
            for h in hooks:
                h.on_epoch_end(state, row)
            state.history.append(row)
            if state.stop:
                break
    except BaseException:
        for h in hooks:  # what the trackers hold so far is written, the failure re-raised
            h.on_fit_error(state)
        raise
    for h in hooks:
        h.on_fit_end(state)
    model.eval()
    return state.history


class _Stepper:
    """One micro-batch's forward and backward (autocast, loss scaling, DDP's gradient sync only on
    the last micro-batch of a step), and the optimiser step (clipping, schedule, constraints)."""

    def __init__(
        self,
        net: nn.Module,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler | None,
        cfg: TrainConfig,
        device: torch.device,
        ranks: Ranks,
    ) -> None:
        self.net, self.model, self.opt, self.sched, self.cfg = net, model, opt, sched, cfg
        self.device, self.ranks = device, ranks
        self.non_blocking = device.type == "cuda"
        precision = PRECISIONS[cfg.precision]
        self.dtype = None if precision.autocast is None else getattr(torch, precision.autocast)
        self.scaler = torch.amp.GradScaler("cuda") if precision.loss_scaling else None
        self.constrain = getattr(model, "constrain", None)
        opt.zero_grad(set_to_none=True)

    def forward_backward(
        self,
        xb: torch.Tensor,
        tb: object,
        yb: torch.Tensor | None,
        loss_fn: Callable,
        last: bool,
        group: int = 1,
    ) -> tuple[torch.Tensor, dict]:
        sync = contextlib.nullcontext()
        if self.ranks.distributed and not last:
            sync = self.net.no_sync()  # type: ignore[operator]  # average once, on the last
        with sync:
            with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
                logits = self.net(xb)
            # The loss in float32 whatever the forward's precision (log-softmax at T, KL sums).
            parts = loss_fn(logits.float(), tb, yb)
            loss = parts["loss"] / group
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return logits, parts

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sched is not None:
            self.sched.step()
        if self.constrain is not None:
            self.constrain()


class _Sums:
    """An epoch's loss parts and train errors, summed on the device (a ``.item()`` per batch
    would sync every step) and read once, added over the ranks under torchrun."""

    def __init__(self, device: torch.device) -> None:
        self.sums = {k: torch.zeros((), device=device) for k in ("loss", "soft", "hard")}
        self.wrong = torch.zeros((), device=device, dtype=torch.long)
        self.rows = self.labeled = 0
        self._new_step()

    def _new_step(self) -> None:
        # The current optimiser step's own sums (not a difference of the epoch's: float32 sums
        # of a long epoch would lose a step's digits).
        zero = self.wrong.new_zeros(())
        self.step_sums = {k: torch.zeros_like(v) for k, v in self.sums.items()}
        self.step_wrong, self.step_rows, self.step_labeled = zero, 0, 0

    def take_step(self) -> dict[str, torch.Tensor]:
        """The step since the last call: mean ``loss``, ``soft``, ``hard`` over its rows and its
        ``train_errors`` (-1: no labels), as 0-d tensors on the device (no sync here)."""
        n = max(self.step_rows, 1)
        out = {k: v / n for k, v in self.step_sums.items()}
        out["train_errors"] = self.step_wrong if self.step_labeled else self.step_wrong - 1
        self._new_step()
        return out

    def add(self, parts: dict, logits: torch.Tensor, yb: torch.Tensor | None, b: int) -> None:
        self.rows += b
        self.step_rows += b
        with torch.no_grad():
            for k in self.sums:
                part = parts[k].detach() * b
                self.sums[k] += part
                self.step_sums[k] += part
            if yb is not None:
                # Negative labels (token positions without a next token, padding) count neither
                # as errors nor as labeled rows.
                counted = yb >= 0
                wrong = ((logits.argmax(dim=1) != yb) & counted).sum()
                self.wrong += wrong
                self.step_wrong += wrong
                labeled = int(counted.sum()) if yb.shape[0] != b else b
                self.labeled += labeled
                self.step_labeled += labeled

    def row(self, ranks: Ranks, device: torch.device, epoch: int) -> dict:
        sums, wrong, rows, labeled = self.sums, self.wrong, self.rows, self.labeled
        if ranks.distributed:
            # The epoch's row is the whole epoch's: every rank's rows, added up.
            total = all_sum(ranks, [*sums.values(), wrong, rows, labeled], device)
            sums = dict(zip(sums, total[:3], strict=True))
            wrong, rows, labeled = total[3], int(total[4]), int(total[5])
        row = {"epoch": epoch, **{k: float(v) / max(rows, 1) for k, v in sums.items()}}
        row["train_errors"] = int(wrong) if labeled else None
        row["train_error_rate"] = float(wrong) / labeled if labeled else None
        return row


def write_history_csv(path: str | Path, history: list[dict]) -> None:
    """Write per-epoch rows as CSV (columns: the union of keys, in first-seen order)."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys and not isinstance(row[k], (list, dict))]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    # Rewritten after every epoch: atomically, so a reader (or a kill) never leaves half a history.
    atomic_write(path, write)
