"""The one training loop.

Teacher training, student distillation from the cache and online distillation all run :func:`fit`;
they differ only in the batch source (what yields ``(x, teacher_logits | None, labels | None)``), an
optional ``teacher_fn`` (online KD: soft targets from a live forward pass) and the loss (a registry
entry). No mode has a loop of its own.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.distributed import SINGLE, Ranks, all_sum, training_seed
from pipeline.errors import KDError
from pipeline.progress import progress_bar, progress_lines
from pipeline.training.callbacks import Callback, FitState
from pipeline.training.fit_callbacks import BestEpoch, EpochLog, Evaluation, HistoryFile, KeepBest
from pipeline.training.losses import DistillationLoss
from pipeline.training.optim import (
    PRECISIONS,
    make_optimizer,
    make_schedule,
)
from pipeline.training.sources import BatchSource, InMemorySource
from pipeline.training.targets import flat_rows
from pipeline.training.tracking import tracking_hooks
from pipeline.training.train_config import TrainConfig


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
