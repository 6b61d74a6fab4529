"""What the one training loop (:func:`pipeline.training.loop.fit`) trains on: a
:class:`BatchSource` yields each epoch's batches; :class:`InMemorySource` serves arrays in memory
(with the paper's random shifts: :func:`random_shift`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from pipeline.data.lazy import is_lazy
from pipeline.distributed import batch_spans

# A batch: raw inputs (B, *shape), teacher logits (B, C) or None, labels (B,) or None.
Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


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


class BatchSource:
    """What :func:`fit` consumes: ``epoch(e)`` yields batches; ``len()`` is batches per epoch (for
    the bar)."""

    def epoch(self, epoch: int) -> Iterable[Batch]:  # pragma: no cover - protocol
        raise NotImplementedError
