"""Training one student on several processes: torch.distributed (DDP), launched by ``torchrun``.

``torchrun --nproc-per-node N kd-pipeline train-student ...`` starts N copies of the same command
with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set (and a rendezvous address); across hosts its
usual ``--nnodes``/``--rdzv-endpoint`` rendezvous sets the same variables. :func:`process_group`
reads them, joins the default process group (``nccl`` on CUDA, each process on GPU
``LOCAL_RANK``; ``gloo`` on the CPU) and says which rank this process is; without them (a plain
run) nothing is initialised and training is exactly the single-process code.

How each epoch is shared, so that every row is used exactly once per epoch across the ranks and
every rank takes the same number of optimiser steps (a rank with one step more would wait forever
in DDP's gradient all-reduce):

- **In memory**: all ranks draw the same seeded permutation; it is cut into *global* batches of
  ``world x batch_size`` rows, and each global batch into one part per rank (:func:`batch_spans`).
  A step therefore trains on exactly the rows a single process with ``--batch-size world x B``
  trains on, so the two runs differ only by float summation order. A last global batch with fewer
  rows than ranks is merged into the one before it.
- **Streaming**: each rank reads only its share of the shards. The epoch's seeded shard order is
  split by *rows*, not by shards (:func:`shard_spans`): rank k serves a contiguous run of that
  order's rows, so shares differ by at most one row (a split by whole shards would differ by up to
  a shard and need DDP's ``join``, which lets optimiser states and learning-rate schedules drift
  apart between ranks). Each rank reads about ``1/world`` of the shards plus at most two boundary
  shards it shares with its neighbours; every row still has exactly one rank. A rank whose share
  ends in a batch the others do not have folds that batch into its previous one (:func:`balanced`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import DistributedError

# What torchrun sets in each process it starts.
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# A debugging hook: when set to a directory, each rank writes the row numbers it trained on per
# epoch there (``rows-rank<k>-epoch<e>.npy``); the tests count them.
RECORD_ROWS_VAR = "KD_RECORD_ROWS"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, evaluates and writes the run directory."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """This rank's device: CUDA device ``LOCAL_RANK`` when training on CUDA under torchrun
        (one GPU per process, whatever ``--device cuda:N`` said), else ``device``."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def share(self) -> tuple[int, int]:
        """``(rank, world)``, as the batch sources take it."""
        return (self.rank, self.world)


SINGLE = Ranks()


def launched(env: dict[str, str] | None = None) -> Ranks:
    """The ranks torchrun's variables describe (:data:`SINGLE` when they are absent).

    Raises:
        DistributedError: the variables are set but not a consistent rank / world size.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "-1"))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise DistributedError(
            f"torchrun variables are not integers (WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
            f"RANK={env.get('RANK')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r}); start the "
            "command with torchrun, or unset them for a single process"
        ) from e
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(
            f"WORLD_SIZE={world} with RANK={rank} is not a rank of the world (expected "
            f"0 <= RANK < WORLD_SIZE); start the command with torchrun, or unset WORLD_SIZE"
        )
    return Ranks(rank=rank, world=world, local_rank=local) if world > 1 else SINGLE


def is_main_process() -> bool:
    """False only on the ranks > 0 of a torchrun job (they do not print results)."""
    return launched().main


def refuse_torchrun(command: str) -> list[str]:
    """A config problem when a dask command runs under torchrun with more than one process.

    Every rank would compute (or train) the same shards (or settings) and fight over the same
    output; these commands fan out over dask (``--workers`` / ``--scheduler``) instead.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        return [
            f"{command} runs under torchrun with WORLD_SIZE={world}, but only train-student "
            f"trains on several processes; run {command} once, without torchrun, and spread it "
            "with --workers N or --scheduler ADDRESS"
        ]
    return []


@contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the torchrun job this process belongs to, if any, for the duration of the block.

    ``nccl`` when training on CUDA (this process takes GPU ``LOCAL_RANK``), else ``gloo``. A
    process group already initialised by the caller is used as it is and left open.

    Raises:
        DistributedError: a CUDA run with fewer GPUs than local ranks, or the rendezvous fails.
    """
    ranks = launched()
    if not ranks.distributed:
        yield SINGLE
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise DistributedError(
                f"rank {ranks.rank} has LOCAL_RANK {ranks.local_rank} but this host has "
                f"{count} GPU(s); start at most {count} processes per node "
                "(torchrun --nproc-per-node), one per GPU"
            )
        torch.cuda.set_device(ranks.local_rank)
    if owned:
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {ranks.rank} of {ranks.world} could not join the torchrun job "
                f"({backend}): {e}; check MASTER_ADDR/MASTER_PORT or --rdzv-endpoint"
            ) from e
    backend = dist.get_backend()
    try:
        yield Ranks(ranks.rank, ranks.world, ranks.local_rank, backend)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def agree(ranks: Ranks, facts: dict[str, Any]) -> None:
    """Check that every rank holds the same ``facts`` (config, cache and data fingerprints, rows,
    steps per epoch); a collective call: every rank must make it.

    Raises:
        DistributedError: on every rank, naming the first fact that differs and the ranks.
    """
    if not ranks.distributed:
        return
    import torch.distributed as dist

    mine = json.loads(json.dumps(facts, sort_keys=True, default=str))
    everyone: list[Any] = [None] * ranks.world
    dist.all_gather_object(everyone, mine)
    for r, theirs in enumerate(everyone):
        if theirs == everyone[0]:
            continue
        key = next(
            k for k in sorted(set(theirs) | set(everyone[0])) if theirs.get(k) != everyone[0].get(k)
        )
        raise DistributedError(
            f"the {ranks.world} processes of this torchrun job disagree: rank 0 has "
            f"{key}={_short(everyone[0].get(key))}, rank {r} has {key}={_short(theirs.get(key))}; "
            "start every rank with the same command, cache and dataset"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    if len(text) <= 80:
        return text
    return f"<{hashlib.sha256(text.encode()).hexdigest()[:12]}…, {len(text)} chars>"


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective call)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    box = [value if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(ranks: Ranks, values: Sequence[float], device: torch.device) -> list[float]:
    """Elementwise sums of ``values`` over the ranks (a collective call)."""
    if not ranks.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def training_seed(seed: int, ranks: Ranks) -> int:
    """The seed of this rank's dropout and augmentation (``seed`` itself on one process).

    Ranks must not draw the same dropout masks and jitter for their different rows; the initial
    weights do not depend on it (DDP copies rank 0's to every rank).
    """
    if not ranks.distributed:
        return seed
    return int(np.random.SeedSequence([seed, ranks.rank, ranks.world]).generate_state(1)[0])


# ---------------------------------------------------------------------------------- epoch shares
def row_share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` for ``rank``: contiguous, sizes differing by at most one."""
    q, extra = divmod(n, world)
    lo = rank * q + min(rank, extra)
    return lo, lo + q + (rank < extra)


def batch_spans(n: int, batch_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's positions ``[lo, hi)`` in an ``n``-row epoch order, one span per step.

    The order is cut into global batches of ``world * batch_size`` rows; each is split over the
    ranks by :func:`row_share`. A last global batch with fewer rows than ranks is merged into the
    previous one, so every rank has a non-empty batch at every step.

    Raises:
        DistributedError: fewer rows than ranks.
    """
    if n < world:
        raise DistributedError(
            f"{n} training rows cannot be shared by {world} processes (each needs at least one "
            "row per step); train on one process or with fewer (torchrun --nproc-per-node)"
        )
    g = world * batch_size
    starts = list(range(0, n, g))
    if len(starts) > 1 and n - starts[-1] < world:
        starts.pop()
    bounds = [*starts, n]
    spans = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        lo, hi = row_share(b - a, rank, world)
        spans.append((a + lo, a + hi))
    return spans


def shard_spans(sizes: Sequence[int], rank: int, world: int) -> list[tuple[int, int, int]]:
    """This rank's contiguous share of the rows of shards visited in the order given.

    Args:
        sizes: rows of each shard, in the epoch's shard order.

    Returns:
        ``(position in the order, lo, hi)`` for each shard the rank reads, with ``[lo, hi)`` the
        rows within that shard it serves.
    """
    lo, hi = row_share(int(sum(sizes)), rank, world)
    spans, start = [], 0
    for i, size in enumerate(sizes):
        a, b = max(lo, start), min(hi, start + size)
        if a < b:
            spans.append((i, a - start, b - start))
        start += size
    return spans


def stream_steps(rows: int, batch_size: int, world: int) -> int:
    """Steps per epoch of every rank of a streamed epoch: the smallest share's batches."""
    if rows < world:
        batch_spans(rows, batch_size, 0, world)  # raises the error that explains it
    return math.ceil((rows // world) / batch_size)


def balanced(batches: Iterable[tuple], steps: int) -> Iterator[tuple]:
    """``batches`` as exactly ``steps`` batches: any beyond ``steps`` are folded into the last.

    A share one row longer than the others can end in a one-row batch the others do not have;
    merging it keeps every rank at the same number of steps without dropping or repeating a row.
    """
    it = iter(batches)
    for _ in range(steps - 1):
        batch = next(it, None)
        if batch is None:
            return
        yield batch
    last = next(it, None)
    if last is None:
        return
    for extra in it:
        last = tuple(_cat(a, b) for a, b in zip(last, extra, strict=True))
    yield last


def _cat(a: Any, b: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if hasattr(a, "cat"):  # sparse soft targets (pipeline.training.targets.SparseTargets)
        return type(a).cat([a, b])
    return np.concatenate([a, b])


class RowRecorder:
    """Wraps a batch source and saves the row numbers each epoch served on this rank (the
    :data:`RECORD_ROWS_VAR` hook): ``DIR/rows-rank<k>-epoch<e>.npy``.

    Row numbers are the source's: dataset rows for a streamed cache, positions in the in-memory
    arrays otherwise (the same thing for a complete cache).
    """

    def __init__(self, source: Any, directory: str | Path, rank: int) -> None:
        self.source, self.directory, self.rank = source, Path(directory), rank
        self.directory.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_rows(self) -> int:
        return self.source.num_rows

    def epoch(self, epoch: int) -> Iterator[tuple]:
        seen = []
        for *batch, rows in self.source.epoch(epoch, with_rows=True):
            seen.append(np.asarray(rows))
            yield tuple(batch)
        rows = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        np.save(self.directory / f"rows-rank{self.rank}-epoch{epoch}.npy", rows)
