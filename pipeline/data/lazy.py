"""Lazy inputs: a split that stays on disk, decoded batch by batch through a torch ``DataLoader``.

A lazy source (:mod:`pipeline.data.sources`) describes one unmodified split as a :class:`RowSource`:
``load(i)`` decodes row ``i`` to a fixed-shape array, ``name(i)`` says where it came from (a file),
``manifest()`` what the split is made of (files, columns, preprocessing). :class:`LazyInputs` is
the ``x`` of a :class:`pipeline.datasets.Dataset` built on one: it has the shape and dtype of the
array it stands for, and indexing it (``x[a:b]``, ``x[idx]``) decodes those rows, in worker
processes when ``workers`` > 0, so every caller that slices ``data.x`` (teacher inference, the
stage-two loader, evaluation) holds only the rows it asked for.

**Identity without a second pass.** A lazy dataset's ``fingerprint`` covers its structure: the
source's manifest (relative file names, columns, preprocessing spec), sample ids and labels. Its
content is covered by per-sample digests (blake2b, 16 bytes, of each decoded sample) computed while
rows are decoded anyway: stage one stores them in the cache (``input_digests``, one chunk per
shard), stage two compares the rows it reads against them, and ``cache verify --dataset`` re-hashes
everything. A shard's hash is the sha256 of its digest block, and the content fingerprint is the
sha256 over the shard hashes (:func:`content_fingerprint`). A changed file is named by the row
whose digest differs.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.data.content import CONTENT_DIGESTS, CONTENT_KEY, DIGEST_BYTES
from pipeline.errors import DatasetError

STATS_SAMPLE = 512  # rows the input mean/std are estimated on (seeded, without a full pass)
READ_BATCH = 256  # rows per DataLoader batch when nobody says otherwise


class RowSource:
    """One unmodified split of a lazy source: rows decoded one at a time.

    Attributes:
        kind: the source's registry name (``folder``, ``hf``, ``py``).
        n: rows in the split.
        sample_shape: shape of every decoded row, e.g. (3, 32, 32).
        dtype: dtype of every decoded row (uint8 for images).
    """

    kind: str = ""
    n: int = 0
    sample_shape: tuple[int, ...] = ()
    dtype: np.dtype = np.dtype(np.uint8)

    def load(self, i: int) -> np.ndarray:  # pragma: no cover - protocol
        """Row ``i`` decoded: an array of ``sample_shape`` and ``dtype``."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """Where row ``i`` comes from, for messages (a file's path)."""
        return f"{self.kind} row {i}"

    def manifest(self) -> dict:  # pragma: no cover - protocol
        """JSON: what the split is made of (no absolute paths: a copy elsewhere is the same)."""
        raise NotImplementedError


def sample_digest(x: np.ndarray) -> np.ndarray:
    """(DIGEST_BYTES,) uint8 blake2b digest of one decoded sample (dtype and shape included)."""
    x = np.ascontiguousarray(x)
    h = hashlib.blake2b(f"{x.dtype.str}{list(x.shape)}".encode(), digest_size=DIGEST_BYTES)
    h.update(memoryview(x).cast("B"))
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


class _Rows:
    """What DataLoader workers decode (a map-style dataset): item k is (k, row ``rows[k]``
    decoded, its digest). Plain numpy: this module imports without torch, as the cache does."""

    def __init__(self, source: RowSource, rows: np.ndarray) -> None:
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(self.source.load(int(self.rows[k])))
        return k, x, sample_digest(x)


# How loader workers start: forkserver where the platform has it (Linux), else its default.
WORKER_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def _picklable(data: Any) -> bool:
    """Whether ``data`` can go to worker processes that were not forked from this one (a user's
    ``py:`` dataset may hold what cannot): otherwise it is decoded in this thread."""
    if WORKER_START is None:
        return True
    try:
        pickle.dumps(data)
    except Exception:  # noqa: BLE001 - any pickling failure means: decode here
        return False
    return True


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the platform has one (a
    container's or ``taskset``'s share), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def loader_workers(asked: int) -> int:
    """The DataLoader worker processes to start for ``--loader-workers asked``: at most one per
    usable core. More only compete for the same cores (decoding is CPU-bound), and torch warns
    about every DataLoader made with more, once per epoch."""
    return min(max(0, int(asked)), usable_cores())


def workers_note(asked: int) -> str | None:
    """The one line saying ``--loader-workers asked`` was reduced to this machine's cores, or
    None when it was not."""
    used = loader_workers(asked)
    if used >= asked:
        return None
    return (
        f"note: --loader-workers {asked} reduced to {used}: this process may use {used} CPU "
        f"core{'s' if used != 1 else ''}, and more decoding processes would only compete for them"
    )


def can_start_workers() -> bool:
    """Loader workers are child processes: a daemonic process (a dask worker, a DataLoader worker)
    may not have any, so it decodes in its own thread instead (the same rows, the same bytes)."""
    return not multiprocessing.current_process().daemon


class LazyInputs:
    """The (N, *sample_shape) inputs of a lazy dataset, decoded when indexed.

    Args:
        source: the unmodified split.
        rows: (N,) positions in ``source`` of this dataset's rows (its sample ids); all by default.
        workers: DataLoader worker processes decoding rows (0: this thread).
        batch_size: rows per DataLoader batch.
    """

    lazy = True

    def __init__(
        self,
        source: RowSource,
        rows: np.ndarray | None = None,
        workers: int = 0,
        batch_size: int = READ_BATCH,
    ) -> None:
        self.source = source
        self.rows = np.arange(source.n, dtype=np.int64) if rows is None else np.asarray(rows)
        self.workers, self.batch_size = loader_workers(workers), batch_size
        # Called with (positions, digests) of every read: stage two compares them with the cache.
        self.expect: Callable[[np.ndarray, np.ndarray], None] | None = None
        self._plan: deque[tuple[int, int]] = deque()
        self._stream: Iterator[tuple[np.ndarray, np.ndarray]] | None = None

    # -- the array it stands for
    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.source.sample_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: np.ndarray) -> LazyInputs:
        """The rows at positions ``idx`` (a subset), still lazy."""
        return LazyInputs(self.source, self.rows[idx], self.workers, self.batch_size)

    def set_loader(self, workers: int, batch_size: int | None = None) -> None:
        """Decode in ``workers`` DataLoader processes (0: this thread; at most one per usable
        core, :func:`loader_workers`), ``batch_size`` rows a batch."""
        self.workers = loader_workers(workers)
        if batch_size:
            self.batch_size = int(batch_size)

    def name(self, position: int) -> str:
        return self.source.name(int(self.rows[position]))

    def __getitem__(self, key: Any) -> np.ndarray:
        positions = np.arange(len(self.rows))[key]
        if np.ndim(positions) == 0:
            return self.read(np.asarray([positions]))[0][0]
        if isinstance(key, slice) and (key.step in (None, 1)) and len(positions):
            return self.read_rows(int(positions[0]), int(positions[-1]) + 1)[0]
        return self.read(positions)[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    # -- reading
    def plan(self, bounds: list[tuple[int, int]]) -> None:
        """Announce the row ranges about to be read, in order: one DataLoader then decodes them all
        ahead (its workers never wait at a range's end). A read off the plan drops it."""
        self._stream = None
        self._plan = deque((int(a), int(b)) for a, b in bounds)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:stop`` decoded, and their (rows, DIGEST_BYTES) digests."""
        if self._plan and self._plan[0] == (start, stop):
            self._plan.popleft()
            if self._stream is None:
                self._stream = self._pieces([(start, stop), *self._plan])
            x, digests = next(self._stream)
        else:
            self._plan.clear()
            self._stream = None
            x, digests = next(self._pieces([(start, stop)]))
        if self.expect is not None:
            self.expect(np.arange(start, stop), digests)
        return x, digests

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows at ``positions`` (any order) decoded, and their digests."""
        positions = np.asarray(positions, dtype=np.int64)
        x, digests = next(self._pieces([positions]))
        if self.expect is not None:
            self.expect(positions, digests)
        return x, digests

    def _pieces(
        self, pieces: list[tuple[int, int] | np.ndarray]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Decode each piece (a range or positions), batch by batch, in one DataLoader."""
        wanted = [np.arange(*p) if isinstance(p, tuple) else p for p in pieces]
        batches = [
            w[i : i + self.batch_size].tolist()
            for w in wanted
            for i in range(0, len(w), self.batch_size)
        ]
        stream = self._batches(batches)
        for w in wanted:
            x = np.empty((len(w), *self.source.sample_shape), dtype=self.dtype)
            digests = np.empty((len(w), DIGEST_BYTES), dtype=np.uint8)
            filled = 0
            while filled < len(w):
                ks, xb, db = next(stream)
                # Rows are matched by their position, never by where they fall in a batch.
                if not np.array_equal(ks, w[filled : filled + len(ks)]):
                    raise DatasetError(
                        f"loader returned rows {ks[:5].tolist()}... where rows "
                        f"{w[filled : filled + 5].tolist()}... were due; this is a bug"
                    )
                x[filled : filled + len(ks)] = xb
                digests[filled : filled + len(ks)] = db
                filled += len(ks)
            yield x, digests

    def _batches(self, batches: list[list[int]]) -> Iterator[tuple[np.ndarray, ...]]:
        data = _Rows(self.source, self.rows)
        if not batches:
            return
        if (
            self.workers <= 0
            or not can_start_workers()
            or len(batches) == 1
            and len(batches[0]) < 2 * self.workers
            or not _picklable(data)
        ):
            for b in batches:
                items = [data[k] for k in b]
                yield (
                    np.asarray(b),
                    np.stack([i[1] for i in items]),
                    np.stack([i[2] for i in items]),
                )
            return
        import torch  # only where worker processes decode

        loader = torch.utils.data.DataLoader(
            data,
            batch_sampler=batches,
            num_workers=self.workers,
            # Workers forked from a clean server process: a plain fork of this one, whose other
            # threads (the cache writer, zarr's I/O) may hold the import lock at that moment,
            # can leave a worker deadlocked before it decodes anything.
            multiprocessing_context=WORKER_START,
            # Pinned batches copy to a GPU asynchronously; without one pinning buys nothing.
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2,
        )
        done = 0
        try:
            for ks, xb, db in loader:
                yield ks.numpy(), xb.numpy(), db.numpy()
                done += 1
        except DatasetError:
            raise
        except Exception:
            # A worker's error arrives re-wrapped with its traceback in the text: decode the batch
            # that failed here, which raises the source's own one-line message.
            for k in batches[done]:
                data[k]
            raise

    # -- identity
    def fingerprint(self, y: np.ndarray | None, ids: np.ndarray) -> str:
        """sha256 over the source's manifest, the sample ids and the labels (no decoding)."""
        h = hashlib.sha256(json.dumps(self.source.manifest(), sort_keys=True).encode())
        h.update(b"ids;" + np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        h.update(b"y;" + (b"none" if y is None else np.ascontiguousarray(y, np.int64).tobytes()))
        return "sha256:" + h.hexdigest()

    def input_stats(self) -> tuple[float, float]:
        """Mean and std of the input values on a seeded sample of STATS_SAMPLE rows."""
        n = len(self.rows)
        pick = np.sort(np.random.default_rng(0).permutation(n)[: min(n, STATS_SAMPLE)])
        # Decoded in this thread: a few hundred rows cost less than starting worker processes,
        # which would also compete with the cache's own loader starting beside them (bench P3).
        workers, self.workers = self.workers, 0
        try:
            block = self.read(pick)[0].astype(np.float64)
        finally:
            self.workers = workers
        if not block.size:
            return 0.0, 1.0
        mean, std = float(block.mean()), float(block.std())
        return mean, (std if std > 0 else 1.0)

    def describe(self) -> dict:
        """What a cache records about the content check and the source."""
        return {
            CONTENT_KEY: CONTENT_DIGESTS,
            "input_stats_sample": min(len(self.rows), STATS_SAMPLE),
            "manifest": self.source.manifest(),
        }


def is_lazy(x: Any) -> bool:
    """Whether ``x`` is a :class:`LazyInputs` (and not an in-memory array)."""
    return bool(getattr(x, "lazy", False))


def digest_check(
    x: LazyInputs, stored: Callable[[int, int], np.ndarray], ids: np.ndarray | None = None
) -> Callable[[np.ndarray, np.ndarray], None]:
    """A check for ``x.expect``: each read row's digest against the stored one.

    Args:
        stored: ``stored(start, stop)`` -> (stop - start, DIGEST_BYTES) digests recorded for rows
            ``start:stop`` (a cache's ``input_digests``).
        ids: (N,) sample ids, named in the message.

    Raises (from the returned function):
        DatasetError: naming the files whose content changed.
    """

    def check(positions: np.ndarray, digests: np.ndarray) -> None:
        if not len(positions):
            return
        lo, hi = int(positions.min()), int(positions.max()) + 1
        want = stored(lo, hi)[positions - lo]
        bad = np.flatnonzero((want != digests).any(axis=1))
        if bad.size:
            rows = positions[bad]
            names = ", ".join(x.name(int(r)) for r in rows[:5])
            raise DatasetError(
                f"{bad.size} input(s) changed since the cache was made: {names}"
                + (" ..." if bad.size > 5 else "")
                + (f" (sample ids {ids[rows[:5]].tolist()})" if ids is not None else "")
                + "; restore the original files, or re-create the cache with cache-logits"
            )

    return check
