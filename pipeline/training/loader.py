"""Streaming cached soft targets into training.

:func:`cache_source` returns a batch source for :func:`pipeline.training.fit` that yields
``(x, teacher_logits, labels)`` with the ensemble already combined (members chosen, mean type
applied at the run's temperature) — so the per-batch cost over plain cross-entropy is one index
into a float32 array.

Two modes, chosen by a memory budget:

- **in memory** (the cache's combined targets and the inputs fit): every shard is read once, whole,
  combined and kept; epochs shuffle rows in memory. Fastest.
- **streaming** (they do not fit): each epoch visits the shards in a seeded random order; a
  background thread reads whole shards (never single rows) ahead of training into a bounded queue;
  rows are shuffled within a buffer spanning several shards. Every row is served exactly once per
  epoch and memory stays near the budget.

Sources hold no open file handles or threads between epochs (a thread lives only while an epoch is
iterated), so they are safe after ``fork``. :class:`CacheIterableDataset` wraps a streaming source
for a torch ``DataLoader`` with workers, each serving a disjoint part of the epoch's shards.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.cache.read import LogitCache
from pipeline.data.lazy import is_lazy
from pipeline.distributed import balanced, shard_spans, stream_steps
from pipeline.ensemble import ENSEMBLE_METHODS, combine_members
from pipeline.errors import CacheError, ConfigError
from pipeline.training.sources import Batch, InMemorySource
from pipeline.training.targets import SparseTargets, sparse_rows

PREFETCH_SHARDS = 2
# Shards decoded (zstd + crc32c) and combined at once by the prefetcher: decoding and torch's
# maths release the GIL, so a few threads read at the codec's speed on several cores.
READ_THREADS = max(1, min(4, os.cpu_count() or 1))
COMBINE_BLOCK_ELEMENTS = 1 << 20  # float32 elements per member-combination block (4 MiB)


def combined_shard(
    cache: LogitCache, shard: int, members: list[int], method: str, temperature: float
) -> torch.Tensor:
    """Read one whole shard and combine the chosen members.

    Returns:
        (rows, C) float32 teacher logits whose softmax at T is the ensemble's distribution.
    """
    # Each member's decoded (rows, C) array as zarr returns it: stacking them first would copy
    # the whole shard once more.
    raw = [torch.from_numpy(a) for a in cache.read_dense(shard, members)]
    return combine_blocks(raw, method, temperature)


def combine_blocks(raw: list[torch.Tensor], method: str, temperature: float) -> torch.Tensor:
    """:func:`pipeline.ensemble.combine_members` of M members' (rows, C) logits, in row
    blocks through one reused float32 buffer.

    The float32 temporaries then stay within ``COMBINE_BLOCK_ELEMENTS`` x 2 (the block and its
    per-class reductions) instead of several copies of the whole (M, rows, C) shard, which is what
    bounds streaming memory for many classes; and the arithmetic mean is taken in probability
    space (one ``exp`` per value instead of two and a ``log``), which is where the loader spent
    most of its time.

    Args:
        raw: M tensors of (rows, C) raw logits (float16 or float32), one per member.

    Returns:
        (rows, C) float32, equal to ``combine_members(torch.stack(raw), method, temperature)``
        within float32 rounding.
    """
    rows, c = raw[0].shape
    if len(raw) == 1:
        return raw[0].float()
    into = ENSEMBLE_METHODS.get(method).into
    if into is None:  # a method without a blocked form combines in one piece
        return combine_members(torch.stack(raw), method, temperature)
    out = torch.empty(rows, c, dtype=torch.float32)
    step = max(1, min(rows, COMBINE_BLOCK_ELEMENTS // (len(raw) * c)))
    block = torch.empty(len(raw), step, c, dtype=torch.float32)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        v, o = block[:, :n], out[start : start + n]
        for k, member in enumerate(raw):
            v[k].copy_(member[start : start + n])  # float16 -> float32 into the reused block
        low = into(v, o, temperature)
        if low.numel():
            # Classes whose probability underflows in every member: those rows are recombined in
            # log space from the stored logits (the block was overwritten).
            idx = low + start
            o[low] = combine_members(
                torch.stack([member[idx] for member in raw]), method, temperature
            )
    return out


def check_member_kinds(
    cache: LogitCache, members: list[int], method: str, loss: str = "kd"
) -> None:
    """Refuse member sets that stage two cannot combine, before anything trains.

    Raises:
        ConfigError: members stored in different kinds or sizes, the geometric mean of sampled
            members, or logit matching on sampled members.
    """
    specs = {m: cache.storage(m) for m in members}
    kinds = {s.text for s in specs.values()}
    problems = []
    if len(kinds) > 1:
        problems.append(
            "members "
            + ", ".join(f"{m} ({s.text})" for m, s in specs.items())
            + " are stored in different kinds; choose members of one kind with --members"
        )
    elif any(s.impl.WEIGHTED for s in specs.values()):
        if ENSEMBLE_METHODS.get(method).geometric and len(members) > 1:
            problems.append(
                f"--ensemble {method} (a geometric mean) needs every member's value on every "
                "class; sampled members hold a few drawn classes each: use --ensemble mean-probs"
            )
        if loss == "logit-mse":
            problems.append(
                "--loss logit-mse needs dense or topk members: sampled rows hold a few drawn "
                "classes' logits, which say nothing unbiased about the others; use --loss kd"
            )
    if problems:
        raise ConfigError(problems)


def shard_targets(
    cache: LogitCache, shard: int, members: list[int], method: str, temperature: float
) -> torch.Tensor | SparseTargets:
    """One whole shard's soft targets at ``temperature``: dense members combined into (rows, C)
    logits (:func:`combined_shard`), sparse ones as :class:`SparseTargets` (combined in the
    loss)."""
    specs = [cache.storage(m) for m in members]
    if not any(s.sparse for s in specs):
        return combined_shard(cache, shard, members, method, temperature)
    arrays = [cache.read_member(shard, m) for m in members]
    return sparse_rows(specs, arrays, cache.num_classes, method, temperature)


def target_bytes_per_row(cache: LogitCache, members: list[int]) -> int:
    """Bytes one row's soft targets take in memory: dense (C float32, members combined) or
    sparse (per member and kept class: index, log-probability, weight, value)."""
    specs = [cache.storage(m) for m in members]
    if not any(s.sparse for s in specs):
        return cache.num_classes * 4
    return sum(int(s.size or 0) * (8 + 4 + 4 + 4) + 4 for s in specs)


@dataclass
class LoaderPlan:
    """How a cache will be served: mode and sizes (recorded in the run)."""

    mode: str  # "memory" | "stream"
    rows: int
    shards: int
    buffer_shards: int
    bytes_in_memory_mode: int
    budget: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan_loader(
    cache: LogitCache,
    x: np.ndarray,
    members: list[int],
    shards: np.ndarray,
    budget: int,
    rows_per_sample: int = 1,
) -> LoaderPlan:
    """Choose memory or streaming mode for ``budget`` bytes.

    In-memory mode holds combined float32 targets (rows x C x 4) and the inputs; streaming holds a
    shuffle buffer of ``buffer_shards`` shards plus ``PREFETCH_SHARDS`` prefetched raw shards.
    Counts are of samples, each with ``rows_per_sample`` rows of targets (a token cache: one per
    position; the labels then take 8 bytes per position too).
    """
    rows = sum(int(np.subtract(*cache.shard_bounds(int(s))[::-1])) for s in shards)
    c = cache.num_classes
    target = target_bytes_per_row(cache, members)
    dense = target == c * 4
    in_bytes = int(np.prod(x.shape[1:])) * x.dtype.itemsize + 8 * (rows_per_sample - 1)
    itemsize = 2 if cache.header.dtype == "float16" else 4
    raw_bytes = len(members) * (c * itemsize if dense else target) * rows_per_sample
    target *= rows_per_sample
    memory_mode = rows * (target + in_bytes)
    if memory_mode <= budget:
        return LoaderPlan("memory", rows, len(shards), len(shards), memory_mode, budget)
    # Streaming: per row in the buffer we hold combined targets + inputs + labels twice (the buffer
    # being served and its concatenated parts); the queue holds PREFETCH_SHARDS combined shards,
    # and READ_THREADS more are being produced, whose raw member logits and float32 combine
    # temporaries also count.
    per_row = 2 * (target + in_bytes + 8)
    prefetch = (PREFETCH_SHARDS + READ_THREADS) * cache.rows_per_shard * (
        target + in_bytes + 8
    ) + READ_THREADS * (
        cache.rows_per_shard * raw_bytes
        + 2
        * 4
        * min(COMBINE_BLOCK_ELEMENTS, cache.rows_per_shard * rows_per_sample * len(members) * c)
    )
    buffer_rows = max(0, budget - prefetch) // per_row
    return LoaderPlan(
        "stream",
        rows,
        len(shards),
        max(1, buffer_rows // cache.rows_per_shard),
        memory_mode,
        budget,
    )


class StreamingCacheSource:
    """Shard-shuffled, buffer-shuffled, prefetched batches from a cache (every row once per epoch).

    Args:
        cache: an open cache.
        x: (N, *shape) inputs of the cache's dataset (row i of the cache is row i of the dataset).
        members: member indices to combine.
        method, temperature: ensemble combination (see :func:`pipeline.ensemble.combine_members`).
        shards: which shards to serve (the finished ones).
        batch_size: rows per batch.
        buffer_shards: shards shuffled together.
        seed: epoch e uses the seed sequence ``[seed, e]`` for its shard order and row shuffles.
        truth: (N,) the dataset's labels: each shard's cached labels must equal them (see
            ``LogitCache.read_labels``); None skips that comparison.
        rank: ``(k, K)``: serve only rank k's contiguous share of each epoch's rows in shard
            order (``pipeline.distributed.shard_spans``), as ``len(self)`` batches on every rank.
    """

    def __init__(
        self,
        cache: LogitCache,
        x: np.ndarray,
        members: list[int],
        method: str,
        temperature: float,
        shards: np.ndarray,
        batch_size: int,
        buffer_shards: int,
        seed: int = 0,
        truth: np.ndarray | None = None,
        rank: tuple[int, int] = (0, 1),
    ) -> None:
        self.cache, self.x, self.members, self.truth = cache, x, list(members), truth
        self.rank = rank
        self.method, self.temperature = method, temperature
        self.shards = np.asarray(shards, dtype=np.int64)
        self.batch_size, self.buffer_shards, self.seed = batch_size, max(1, buffer_shards), seed
        self.rows = sum(int(np.subtract(*cache.shard_bounds(int(s))[::-1])) for s in self.shards)
        self.labeled = cache.labeled

    def __len__(self) -> int:
        if self.rank[1] > 1:
            return stream_steps(self.rows, self.batch_size, self.rank[1])
        return math.ceil(self.rows / self.batch_size)

    @property
    def num_rows(self) -> int:
        return self.rows

    def _read(
        self, shard: int
    ) -> tuple[np.ndarray, torch.Tensor | SparseTargets, np.ndarray | None, np.ndarray]:
        start, stop = self.cache.shard_bounds(shard)
        teacher = shard_targets(self.cache, shard, self.members, self.method, self.temperature)
        labels = self.cache.read_labels(shard, truth=self.truth)
        return self.x[start:stop], teacher, labels, np.arange(start, stop)

    def epoch(
        self, epoch: int, with_rows: bool = False, part: tuple[int, int] = (0, 1)
    ) -> Iterator[Batch]:
        """Yield the epoch's batches; ``part=(k, K)`` serves only every K-th shard of the order from
        k (workers)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.shards)[part[0] :: part[1]]
        pieces = [(int(s), 0, None) for s in order]  # (shard, rows lo, hi): whole shards
        if self.rank[1] > 1:
            sizes = [int(np.subtract(*self.cache.shard_bounds(int(s))[::-1])) for s in order]
            pieces = [(int(order[i]), lo, hi) for i, lo, hi in shard_spans(sizes, *self.rank)]
            rng = np.random.default_rng([self.seed, epoch, *self.rank])  # its own row shuffles
        if is_lazy(self.x):  # its DataLoader decodes the epoch's shards ahead, in this order
            self.x.plan([self.cache.shard_bounds(s) for s, _, _ in pieces])
        q: queue.Queue = queue.Queue(maxsize=PREFETCH_SHARDS)
        stop = threading.Event()

        # A lazy dataset's loader decodes the planned ranges one after another, on one thread:
        # then one reading thread, which reads the shards in the epoch's order.
        threads = 1 if is_lazy(self.x) else READ_THREADS

        def producer() -> None:
            # Up to ``threads`` shards are read and combined at once, handed on in order.
            pending: deque[tuple[Future, int | None, int | None]] = deque()
            todo = iter(pieces)
            try:
                with ThreadPoolExecutor(threads, thread_name_prefix="cache-read") as pool:
                    while True:
                        while len(pending) < threads and not stop.is_set():
                            nxt = next(todo, None)
                            if nxt is None:
                                break
                            pending.append((pool.submit(self._read, nxt[0]), nxt[1], nxt[2]))
                        if not pending or stop.is_set():
                            break
                        fut, lo, hi = pending.popleft()
                        item = fut.result()
                        q.put(
                            item
                            if hi is None
                            else tuple(v if v is None else v[lo:hi] for v in item)
                        )
                    for fut, *_ in pending:
                        fut.cancel()
                if not stop.is_set():
                    q.put(None)
            except BaseException as e:  # noqa: BLE001 - surfaced on the consumer side
                q.put(e)

        thread = threading.Thread(target=producer, name="cache-prefetch", daemon=True)
        thread.start()
        try:
            batches = self._batches(q, rng, with_rows)
            yield from batches if self.rank[1] == 1 else balanced(batches, len(self))
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def _batches(self, q: queue.Queue, rng: np.random.Generator, with_rows: bool) -> Iterator:
        carry: list | None = None  # a partial batch carried into the next buffer
        done = False
        # The shuffle buffer's inputs and dense targets, reused from one buffer to the next: a
        # fresh (rows, C) float32 buffer each time costs its page faults again, about as much as
        # the copy into it. Batches are gathered out of it (copies), so none aliases it.
        space: dict[str, Any] = {}
        while not done:
            parts = [] if carry is None else [carry]
            for _ in range(self.buffer_shards):
                item = q.get()
                if item is None:
                    done = True
                    break
                if isinstance(item, BaseException):
                    raise item
                parts.append(item)
            if not parts:
                break
            xs = _join([p[0] for p in parts], space, "x")
            ts = _join([p[1] for p in parts], space, "t")
            ys = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
            rows = np.concatenate([p[3] for p in parts])
            parts.clear()  # the shards are copied into the buffer: free them before serving it
            perm = rng.permutation(xs.shape[0])
            n_full = xs.shape[0] if done else (xs.shape[0] // self.batch_size) * self.batch_size
            for start in range(0, n_full, self.batch_size):
                idx = perm[start : start + self.batch_size]
                batch = (
                    torch.from_numpy(xs[idx]),
                    _take(ts, idx),
                    None if ys is None else torch.from_numpy(ys[idx]),
                )
                yield (*batch, rows[idx]) if with_rows else batch
            rest = perm[n_full:]
            carry = (
                None
                if rest.size == 0
                else (
                    xs[rest],
                    _take(ts, rest),
                    None if ys is None else ys[rest],
                    rows[rest],
                )
            )


def _join(
    parts: list, space: dict[str, Any], key: str
) -> np.ndarray | torch.Tensor | SparseTargets:
    """``parts`` (numpy arrays, dense tensors or :class:`SparseTargets`) joined along rows into
    ``space[key]`` (grown or replaced when it does not fit, otherwise reused).

    Returns:
        the joined rows, in ``space[key]``'s memory: the next call with ``key`` overwrites them.
    """
    first = parts[0]
    if isinstance(first, SparseTargets):
        return SparseTargets.cat(parts, space.setdefault(f"{key}.sparse", {}))
    total = sum(int(p.shape[0]) for p in parts)
    held = space.get(key)
    if held is None or held.shape[0] < total or held.shape[1:] != first.shape[1:]:
        held = space[key] = (
            torch.empty((total, *first.shape[1:]), dtype=first.dtype)
            if isinstance(first, torch.Tensor)
            else np.empty((total, *first.shape[1:]), dtype=first.dtype)
        )
    out = held[:total]
    if isinstance(out, torch.Tensor):
        torch.cat(parts, out=out)
    else:
        np.concatenate(parts, out=out)
    return out


def _take(targets: torch.Tensor | SparseTargets, idx: np.ndarray) -> torch.Tensor | SparseTargets:
    """Rows ``idx`` of the buffer's targets, copied (``index_select``: a plain row gather, about
    twice as fast as advanced indexing)."""
    if isinstance(targets, SparseTargets):
        return targets.take(torch.from_numpy(idx))
    return torch.index_select(targets, 0, torch.from_numpy(idx))


def finished_shards(
    cache: LogitCache, members: list[int], shards: np.ndarray | None = None
) -> np.ndarray:
    """The shards a run serves (``shards``, else every chosen member's finished ones).

    Raises:
        CacheError: none is finished: training on 0 rows would still write a student.
    """
    shards = cache.done_shards(members) if shards is None else np.asarray(shards, dtype=np.int64)
    if not len(shards):
        raise CacheError(
            f"{cache.location}: no finished shards yet (0/{cache.n_shards} done for "
            f"members {members}); wait for cache-logits to finish some, or run it "
            f"(`kd-pipeline cache-logits ... --out {cache.location}` resumes)"
        )
    return shards


def cache_source(
    cache: LogitCache,
    x: np.ndarray,
    members: list[int],
    method: str,
    temperature: float,
    batch_size: int,
    budget: int,
    seed: int = 0,
    shards: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    rank: tuple[int, int] = (0, 1),
) -> tuple[InMemorySource | StreamingCacheSource, LoaderPlan]:
    """The batch source for a run: in memory when it fits ``budget`` bytes, streaming otherwise.

    Args:
        shards: the shards to serve: the run's snapshot of the finished ones (default: the
            cache's, ``cache.done_shards(members)``).
        truth: (N,) the dataset's labels, which each shard's cached labels must equal.
        rank: ``(k, K)``: the source serves rank k's share of each epoch (DDP).

    Raises:
        CacheError: no shard is finished (training on 0 rows would still write a student), or what
            the reader refuses in a shard (in memory mode here, while streaming during the epoch).
    """
    shards = finished_shards(cache, members, shards)
    plan = plan_loader(cache, x, members, shards, budget)
    if plan.mode == "stream":
        return StreamingCacheSource(
            cache,
            x,
            members,
            method,
            temperature,
            shards,
            batch_size,
            plan.buffer_shards,
            seed,
            truth=truth,
            rank=rank,
        ), plan
    rows = np.concatenate([np.arange(*cache.shard_bounds(int(s))) for s in shards])
    teacher: torch.Tensor | SparseTargets
    if any(cache.storage(m).sparse for m in members):
        # Sparse rows are small (K classes each): joined once.
        teacher = SparseTargets.cat(
            [shard_targets(cache, int(s), members, method, temperature) for s in shards]
        )
    else:
        # Filled shard by shard: a list of shards followed by torch.cat would hold the targets
        # twice (2x the budget).
        teacher = torch.empty(len(rows), cache.num_classes)
        pos = 0
        for s in shards:
            part = combined_shard(cache, int(s), members, method, temperature)
            teacher[pos : pos + part.shape[0]] = part
            pos += part.shape[0]
    labels = None
    if cache.labeled:
        labels = np.concatenate([cache.read_labels(int(s), truth=truth) for s in shards])
    all_rows = len(rows) == cache.n
    xs = x if all_rows and not is_lazy(x) else x[rows]  # a lazy dataset's rows decode here
    return InMemorySource(xs, labels, teacher, batch_size=batch_size, seed=seed, rank=rank), plan


class CacheIterableDataset(torch.utils.data.IterableDataset):
    """A streaming cache source for torch's ``DataLoader`` (use ``batch_size=None``: batches are
    already made).

    Each loader worker serves a disjoint slice of the epoch's shuffled shard order, so across
    workers every row is still served exactly once per epoch. Call :meth:`set_epoch` before each
    epoch.
    """

    def __init__(
        self, source: StreamingCacheSource, epoch: int = 0, with_rows: bool = False
    ) -> None:
        super().__init__()
        self.source, self.epoch, self.with_rows = source, epoch, with_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        part = (0, 1) if info is None else (info.id, info.num_workers)
        yield from self.source.epoch(self.epoch, with_rows=self.with_rows, part=part)
