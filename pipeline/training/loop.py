"""The one training loop.

Teacher training, student distillation from the cache and online distillation all run :func:`fit`;
they differ only in the batch source (what yields ``(x, teacher_logits | None, labels | None)``), an
optional ``teacher_fn`` (online KD: soft targets from a live forward pass) and the loss (a registry
entry). No mode has a loop of its own.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.checks import at_least, collect, one_of, positive
from pipeline.data.lazy import is_lazy
from pipeline.distributed import SINGLE, Ranks, all_sum, batch_spans, training_seed
from pipeline.errors import ConfigError, KDError
from pipeline.files import atomic_write
from pipeline.options import option, parse_clip
from pipeline.progress import progress_bar, progress_lines
from pipeline.training.losses import DistillationLoss

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")

# A batch: raw inputs (B, *shape), teacher logits (B, C) or None, labels (B,) or None.
Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


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
    lr: float = option(1e-3, help="Peak learning rate.")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="Optimiser (sgd uses --momentum).")
    momentum: float = option(0.9, help="SGD momentum.")
    weight_decay: float = option(0.0, help="L2 weight decay.")
    grad_clip: float | None = option(
        5.0, parse=parse_clip, metavar="FLOAT", help="Clip the gradient norm to this (0 disables)."
    )
    lr_schedule: str = option(
        "cosine", choices=LR_SCHEDULES, help="Learning-rate schedule over all steps."
    )
    seed: int = option(
        0,
        help="Seed for weight initialisation, dropout and shuffling (dataset "
        "subsets take their own seed=).",
    )

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every invalid field at once."""
        problems = collect(
            at_least("epochs", self.epochs, 1),
            at_least("batch_size", self.batch_size, 1),
            positive("lr", self.lr),
            one_of("optimizer", self.optimizer, OPTIMIZERS),
            one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES, prose=True),
            positive("grad_clip", self.grad_clip, optional=True),
        )
        if problems:
            raise ConfigError(problems)

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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
) -> list[dict]:
    """Train ``model`` in place; return one dict per epoch.

    Args:
        model: maps raw inputs (B, *shape) to logits (B, C); already on ``device``.
        source: yields ``(x, teacher_logits | None, labels | None)`` per batch, every row once per
            epoch.
        loss_fn: ``loss_fn(student_logits, teacher_logits, labels) -> {"loss", "soft", "hard"}``.
        cfg: optimisation settings.
        device: where to train.
        teacher_fn: online distillation: raw inputs (B, *shape) on ``device`` -> teacher logits
            (B, C), used when the source gives none (applied to the same augmented inputs the
            student sees).
        augment: train-time transform of raw inputs on ``device`` (e.g. jitter).
        evaluate: called after each epoch on the model (in eval mode); its dict is merged into the
            epoch row (e.g. ``test_errors``).
        history_csv: if given, the per-epoch rows are written there (rewritten after every epoch).
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

    Returns:
        Per-epoch rows: ``epoch``, ``loss``, ``soft``, ``hard`` (means over rows), ``train_errors``,
        ``train_error_rate``, ``lr``, ``seconds``, plus what ``evaluate`` returned.
    """
    cfg.validate()
    torch.manual_seed(training_seed(cfg.seed, ranks))
    net = model
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # DDP copies rank 0's weights to the other ranks here and averages gradients in backward.
        net = DistributedDataParallel(
            model, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
    opt = make_optimizer(model, cfg)
    total_steps = cfg.epochs * max(1, len(source))
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if cfg.lr_schedule == "cosine"
        else None
    )
    constrain = getattr(model, "constrain", None)
    non_blocking = device.type == "cuda"
    history: list[dict] = []
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        # Sums are kept on the device and read once per epoch: a .item() per batch would sync every
        # step.
        sums = {k: torch.zeros((), device=device) for k in ("loss", "soft", "hard")}
        wrong = torch.zeros((), device=device, dtype=torch.long)
        rows = labeled = 0
        bar = progress_bar(
            source.epoch(epoch),
            total=len(source),
            enabled=progress,
            desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            unit="batch",
        )
        # Redirected into a log, a long epoch says how far it is every LINE_SECONDS instead.
        lines = progress_lines(
            len(source), f"{desc} epoch {epoch + 1}/{cfg.epochs}", log, enabled=progress, bar=bar
        )
        for xb, tb, yb in bar:
            xb = xb.to(device, non_blocking=non_blocking)
            tb = None if tb is None else tb.to(device, non_blocking=non_blocking)
            yb = None if yb is None else yb.to(device, non_blocking=non_blocking)
            if augment is not None:
                xb = augment(xb)
            if tb is None and teacher_fn is not None:
                with torch.inference_mode():
                    tb = teacher_fn(xb)
                tb = tb.clone()  # leave inference mode: autograd may touch it in the loss
            logits = net(xb)
            parts = loss_fn(logits, tb, yb)
            loss = parts["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            if constrain is not None:
                constrain()
            b = xb.shape[0]
            rows += b
            with torch.no_grad():
                for k in sums:
                    sums[k] += parts[k].detach() * b
                if yb is not None:
                    # Negative labels (token positions without a next token, padding) count
                    # neither as errors nor as labeled rows.
                    counted = yb >= 0
                    wrong += ((logits.argmax(dim=1) != yb) & counted).sum()
                    labeled += int(counted.sum()) if yb.shape[0] != b else b
            if lines is not None:
                lines.update(b)
        seconds = time.perf_counter() - t0
        if ranks.distributed:
            # The epoch's row is the whole epoch's: every rank's rows, added up.
            total = all_sum(ranks, [*sums.values(), wrong, rows, labeled], device)
            sums = dict(zip(sums, total[:3], strict=True))
            wrong, rows, labeled = total[3], int(total[4]), int(total[5])
        row = {k: float(v) / max(rows, 1) for k, v in sums.items()}
        if not math.isfinite(row["loss"]):
            raise KDError(
                f"training diverged in epoch {epoch + 1}: the loss is {row['loss']}; lower --lr, "
                "keep the default --optimizer adam and --grad-clip, or check the inputs"
            )
        row = {
            "epoch": epoch + 1,
            **row,
            "train_errors": int(wrong) if labeled else None,
            "train_error_rate": float(wrong) / labeled if labeled else None,
            "lr": opt.param_groups[0]["lr"],
            "seconds": seconds,
        }
        if evaluate is not None:
            model.eval()
            row.update(evaluate(model))
            if keep_best is not None and keep_best.key in row:
                row["selected"] = keep_best.offer(model, row)
        history.append(row)
        if history_csv is not None:
            write_history_csv(history_csv, history)
        if log is not None:
            extra = "".join(f" {k}={row[k]}" for k in ("val_errors", "test_errors") if k in row)
            log(
                f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss={row['loss']:.4f} "
                f"soft={row['soft']:.4f} hard={row['hard']:.4f} "
                f"train_errors={row['train_errors']}{extra} ({seconds:.1f}s)"
            )
    if keep_best is not None:
        keep_best.restore(model)
    model.eval()
    return history


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
