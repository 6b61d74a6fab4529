"""Reading a cache: :class:`LogitCache`, which checks what it serves as it reads it.

The format is specified in docs/cache-format.md. This module imports without torch (numpy + zarr
only), so data tools can read caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.cache.header import (
    VIEW_PARAMS,
    DatasetRecord,
    MemberRecord,
    expected_arrays,
    member_array,
    member_done,
)
from pipeline.cache.info import CacheInfo
from pipeline.cache.kinds import StorageSpec
from pipeline.cache.layout import array_handle, group_header, ids_list, row_ids
from pipeline.cache.location import CacheLocation
from pipeline.cache.lookup import check_metadata_size
from pipeline.cache.read_checks import (
    REPAIR,
    AbsentChunk,
    MissingChunkError,
    NoFillStore,
    bad_rows,
    cheap_problem,
    chunk_of,
)
from pipeline.cache.rows import row_index_problems, view_param_problems, view_plan
from pipeline.cache.store_keys import key_sizes, refuse_unfinished_copy
from pipeline.data.content import DIGESTS_ARRAY
from pipeline.errors import CacheError, KDError


class LogitCache:
    """Read access to a cache. Opening never writes.

    What it serves is checked as it is read (cheap checks on the shards actually read): a missing
    data chunk, non-finite logits and labels outside ``0..C-1`` (or differing from the dataset's,
    when given) raise ``CacheError``, never a fill value. Opening checks every array's shape, dtype
    and chunks against the header. The done flags are read once (:meth:`done_flags`), so everything
    one reader serves comes from one snapshot of the finished shards, even while a writer adds
    more.

    Args:
        location: the cache: a :class:`~pipeline.cache.location.CacheLocation`, or a directory, a
            ``.zarr.zip`` bundle or an ``s3://`` URL (then without storage options: the AWS
            environment's).
        allow_partial: accept an incomplete cache (only finished shards are then served).

    Raises:
        CacheError: missing, not a cache, bad header, arrays that disagree with it, or partial
            without ``allow_partial``.
    """

    def __init__(self, location: str | Path | CacheLocation, allow_partial: bool = False) -> None:
        self.location = CacheLocation.parse(location)
        if not self.location.exists():
            raise CacheError(
                f"{self.location}: no such cache; create one with `kd-pipeline "
                f"cache-logits --out {self.location} ...`"
            )
        self.store = self.location.open("r")  # read-only: reading never writes
        refuse_unfinished_copy(self.store, self.location.display)
        check_metadata_size(self.store, self.location.display)
        try:
            # zarr_format=3: zarr reads zarr.json alone. Left to guess, it reads the format 2
            # documents concurrently, and when the guard refuses zarr.json those reads are left
            # unretrieved ("Future exception was never retrieved" at exit).
            self.group = zarr.open_group(
                NoFillStore(self.store), mode="r", use_consolidated=False, zarr_format=3
            )
        except zarr.errors.GroupNotFoundError as e:  # zarr's text names its internals
            raise CacheError(
                f"{self.location}: not a logit cache (no zarr.json at its root); "
                "give the directory, NAME.zarr.zip or s3:// URL that "
                "`kd-pipeline cache-logits --out` wrote"
            ) from e
        except KDError:
            raise  # the read guard's own message names the document and what is wrong with it
        except Exception as e:  # zarr raises several types for a non-group path
            raise CacheError(
                f"{self.location}: not a Zarr v3 group ({type(e).__name__}: {e})"
            ) from e
        self.header = group_header(self.group, self.location.display)
        self._done: dict[int, np.ndarray] | None = None
        self._check_layout()
        if not self.complete and not allow_partial:
            done, total = self.count_done()
            raise CacheError(
                f"{self.location}: the cache is partial ({done}/{total} member-shards written). "
                "Finish it by re-running the same `kd-pipeline cache-logits` command (it resumes), "
                "or pass --allow-partial to use only the finished shards"
            )

    def _check_layout(self) -> None:
        """Refuse arrays whose shape, dtype or chunks differ from what the header implies.

        Readers index arrays by the header's ``n``, ``num_classes`` and ``rows_per_shard``; a
        disagreement would otherwise surface as a numpy error deep in training, or as misaligned
        rows.
        """
        problems = []
        for name, shape, dtype, chunks in expected_arrays(self.header):
            arr = self._array(name)
            found = (tuple(arr.shape), str(arr.dtype), tuple(arr.chunks))
            if found != (shape, dtype, chunks):
                problems.append(
                    f"array {name} has shape {found[0]}, dtype {found[1]}, chunks "
                    f"{found[2]}; the header says shape {shape}, dtype {dtype}, "
                    f"chunks {chunks}"
                )
        if problems:
            raise CacheError(
                f"{self.location}: the arrays disagree with the header (n={self.n}, "
                f"num_classes={self.num_classes}, rows_per_shard="
                f"{self.rows_per_shard}): "
                + "; ".join(problems)
                + ". The cache was damaged or edited. "
                + REPAIR.format(where=self.location)
            )

    # -- header fields
    @property
    def complete(self) -> bool:
        return self.header.complete

    @property
    def n(self) -> int:
        return self.header.n

    @property
    def num_classes(self) -> int:
        return self.header.num_classes

    @property
    def n_shards(self) -> int:
        return self.header.n_shards

    @property
    def rows_per_shard(self) -> int:
        return self.header.rows_per_shard

    @property
    def members(self) -> tuple[MemberRecord, ...]:
        return self.header.members

    @property
    def labeled(self) -> bool:
        return self.header.labeled

    @property
    def dataset(self) -> DatasetRecord:
        return self.header.dataset

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        return self.header.shard_bounds(shard)

    # -- completion
    def done_flags(self, member: int) -> np.ndarray:
        """(S,) bool: which shards of ``member`` are written, as of this reader's first look.

        Every member's flags are read together, once: every later question (which shards to serve,
        how many rows, what to record) gets the same answer during one run, while a writer may be
        adding shards.

        Raises:
            CacheError: the header says complete but some flag is missing or zero.
        """
        if self._done is None:
            flags = {
                m.index: self._read(member_done(m.index), slice(None)).astype(bool)
                for m in self.members
            }
            if self.complete:
                self._check_complete(flags)
            self._done = flags
        return self._done[member].copy()

    def _check_complete(self, flags: dict[int, np.ndarray]) -> None:
        """A complete header promises every flag: a missing one would silently drop rows."""
        undone = [
            f"member {m} shards {np.flatnonzero(~f)[:10].tolist()}"
            for m, f in flags.items()
            if not f.all()
        ]
        if undone:
            raise CacheError(
                f"{self.location}: the header says the cache is complete, but done flags are "
                f"missing or zero ({'; '.join(undone)}): the cache was damaged or edited, and "
                "using it would silently train on fewer rows. " + REPAIR.format(where=self.location)
            )

    def done_shards(self, members: list[int] | None = None) -> np.ndarray:
        """Indices of the shards that every chosen member has finished (from the one snapshot)."""
        chosen = range(len(self.members)) if members is None else members
        flags = np.ones(self.n_shards, dtype=bool)
        for m in chosen:
            flags &= self.done_flags(m)
        return np.flatnonzero(flags)

    def count_done(self) -> tuple[int, int]:
        """(member-shards written, member-shards in all)."""
        done = sum(int(self.done_flags(m.index).sum()) for m in self.members)
        return done, self.n_shards * len(self.members)

    # -- data
    def _array(self, path: str) -> zarr.Array:
        try:
            arr = array_handle(self.group, path, self.__dict__.setdefault("_arrays", {}))
        except KeyError:
            raise CacheError(
                f"{self.location}: array {path!r} is missing; the cache is damaged"
            ) from None
        except KDError:
            raise  # the read guard's message already names the document and what is wrong
        except Exception as e:  # noqa: BLE001 - zarr's parse errors (JSON, schema, nesting) vary
            # Opening parses the array's zarr.json (and its groups'): since opening checks every
            # array, a damaged one must be refused here, by name, not as zarr's exception.
            raise CacheError(
                f"{self.location}: the metadata of array {path!r} does not parse "
                f"({type(e).__name__}: {str(e)[:200]}); the cache is damaged. "
                + REPAIR.format(where=self.location)
            ) from None
        if not isinstance(arr, zarr.Array):
            raise CacheError(
                f"{self.location}: {path!r} is a group, expected an array; the cache is damaged"
            )
        return arr

    def _read(self, path: str, sel: Any) -> np.ndarray:
        arr = self._array(path)
        try:
            return np.asarray(arr[sel])
        except AbsentChunk as e:
            raise self._missing(str(e), path) from None
        except Exception as e:  # checksum mismatch, decompression failure, truncated object
            chunk = chunk_of(sel, arr.chunks)
            raise CacheError(
                f"{self.location}: cannot read chunk {chunk} of array {path!r} "
                f"({type(e).__name__}: {e}); the cache is corrupted there. Re-create that shard by "
                "deleting the cache's member or re-running `kd-pipeline cache-logits` into a fresh "
                "--out, or get a good copy"
            ) from e

    def _missing(self, key: str, path: str) -> MissingChunkError:
        """The error for data chunk ``key`` of array ``path`` having no object."""
        shard = int(key.removeprefix(path + "/c/").split("/")[0])
        start, stop = self.shard_bounds(shard)
        parts = path.split("/")
        whose = f"member {parts[1]}'s {parts[2]}" if path.startswith("members/") else path
        return MissingChunkError(
            f"{self.location}: chunk {key} ({whose}, shard {shard}: rows {start}..{stop - 1}) is "
            "missing. A cache stores every such chunk, so it was deleted or lost; its rows are not "
            "served as zarr's fill value. " + REPAIR.format(where=self.location),
            key,
        )

    def storage(self, member: int) -> StorageSpec:
        """How member ``member``'s rows are stored (format 1: dense)."""
        return self.header.storage(member)

    def row_bounds(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of the member arrays in ``shard``."""
        return self.header.row_bounds(shard)

    def read_logits(self, shard: int, members: list[int] | None = None) -> np.ndarray:
        """One whole shard of raw logits of dense members.

        Returns:
            (M, rows, C) array in the storage dtype (float16 by default), members in the given
            order.

        Raises:
            CacheError: a chunk is missing or unreadable, or holds NaN/inf (the writer never
                stores them); a chosen member is stored sparse (read it with
                :meth:`read_member`).
        """
        return np.stack(self.read_dense(shard, members))

    def read_dense(self, shard: int, members: list[int] | None = None) -> list[np.ndarray]:
        """:meth:`read_logits` as one (rows, C) array per member, as decoded (no stacking copy).

        Raises:
            CacheError: as :meth:`read_logits`.
        """
        chosen = range(len(self.members)) if members is None else members
        for m in chosen:
            spec = self.storage(m)
            if spec.sparse:
                raise CacheError(
                    f"{self.location}: member {m} is stored {spec.text}, and this step needs "
                    "every class's logit (dense members); re-create the cache with --store dense "
                    "for it"
                )
        return [self.read_member(shard, m)["logits"] for m in chosen]

    def read_member(self, shard: int, member: int) -> dict[str, np.ndarray]:
        """One whole shard of one member's stored arrays, by name (its storage kind's).

        Returns:
            ``{"logits": (rows, C)}`` for a dense member; ``{"values", "indices", "tail_lse"}``
            or ``{"values", "indices", "lse"}`` for a sparse one (see :mod:`pipeline.cache.kinds`).

        Raises:
            CacheError: a chunk is missing or unreadable, or holds what the writer never stores
                (NaN/inf values, class indices outside ``0..C-1``, NaN log-sum-exps).
        """
        spec = self.storage(member)
        start, stop = self.row_bounds(shard)
        out = {}
        for name, _, _ in spec.impl.arrays(spec, self.num_classes, self.header.dtype):
            out[name] = self._read(member_array(member, name), slice(start, stop))
        problem = cheap_problem(out, self.num_classes)
        if not problem and spec.sparse:
            # A sparse kind's invariants (sorted, distinct classes, log-sum-exps consistent with
            # the kept values and with each other) are what its arithmetic at T relies on: every
            # reader checks them, as ``cache verify`` does (a few % of a streaming epoch).
            found = spec.impl.check(spec, out, self.num_classes)
            if found:
                raise CacheError(
                    f"{self.location}: member {member} ({spec.text}), shard {shard} (cache rows "
                    f"{start}..{stop - 1}): " + "; ".join(found) + " (rows counted from the "
                    "shard's first). cache-logits never stores such rows, so the arrays were "
                    "altered; training on them would learn a distribution the teacher never "
                    "gave. " + REPAIR.format(where=self.location)
                )
        if problem:
            bad = bad_rows(out, self.num_classes)
            raise CacheError(
                f"{self.location}: member {member}'s {problem[0]} in shard {shard} "
                f"{problem[1]} for sample ids "
                f"{ids_list(row_ids(self.header, shard, self.read_ids(shard), bad))}. "
                "cache-logits never stores them, so the chunk was altered; training on it would "
                "diverge or learn nothing there. " + REPAIR.format(where=self.location)
            )
        return out

    def read_labels(
        self, shard: int | None = None, *, truth: np.ndarray | None = None
    ) -> np.ndarray | None:
        """(rows,) int64 labels of one shard (all rows when ``shard`` is None); None if unlabeled.

        Args:
            truth: (N,) the dataset's labels (row i of the cache is row i of the dataset), when
                the caller holds them: the cached labels must then equal them. A missing labels
                chunk is accepted only where ``truth`` proves zarr's fill value right (all class
                0): caches made before every chunk was stored omitted such a chunk.

        Raises:
            CacheError: a missing chunk (unless excused as above), labels outside ``0..C-1``, or
                labels that differ from ``truth``; each naming the sample ids.
        """
        if not self.labeled:
            return None
        start, stop = (0, self.n) if shard is None else self.shard_bounds(shard)
        expected = None if truth is None else np.asarray(truth)[start:stop]
        try:
            labels = self._read("labels", slice(start, stop))
        except MissingChunkError:
            if expected is None or expected.any():
                raise
            if shard is None:  # find the missing chunks shard by shard
                return np.concatenate(
                    [self.read_labels(s, truth=truth) for s in range(self.n_shards)]
                )
            labels = np.zeros(stop - start, dtype=np.int64)
        self._check_labels(labels, start, expected)
        return labels

    def _check_labels(self, labels: np.ndarray, start: int, expected: np.ndarray | None) -> None:
        """Labels outside ``0..C-1`` (an IndexError in training) or unlike the dataset's."""
        c = self.num_classes
        bad = np.flatnonzero((labels < 0) | (labels >= c))
        what = f"hold labels outside 0..{c - 1} ({labels[bad[:5]].tolist()})"
        if not bad.size and expected is not None:
            bad = np.flatnonzero(labels != expected)
            what = (
                f"hold labels {labels[bad[:5]].tolist()} where the dataset "
                f"{self.dataset.spec} has {expected[bad[:5]].tolist()}"
            )
        if bad.size:
            ids = self._read("ids", slice(start, start + labels.size))[bad]
            raise CacheError(
                f"{self.location}: the cached labels of sample ids "
                f"{ids_list(ids, 5)} {what}: they were altered. "
                + REPAIR.format(where=self.location)
            )

    def read_digests(self, start: int, stop: int) -> np.ndarray:
        """(rows, 16) uint8 input digests of rows ``start:stop`` (caches of lazy datasets)."""
        return self._read(DIGESTS_ARRAY, slice(start, stop))

    def read_view_params(self, shard: int | None = None) -> np.ndarray | None:
        """(rows, P) float32 explicit augmentation parameters of one shard's rows (all rows when
        ``shard`` is None), ordered like the member rows; None for a cache without views.

        Raises:
            CacheError: a missing or unreadable chunk, or non-finite parameters.
        """
        if self.header.view_params is None:
            return None
        rows = slice(*self.row_bounds(shard)) if shard is not None else slice(None)
        params = self._read(VIEW_PARAMS, rows)
        if not np.isfinite(params).all():
            raise CacheError(
                f"{self.location}: view_params of shard {shard} hold NaN or inf; cache-logits "
                "never stores them, so the chunk was altered. " + REPAIR.format(where=self.location)
            )
        if "_view_plan" not in self.__dict__:
            self._view_plan = view_plan(self.header)
        if self._view_plan is not None:
            first = rows.start or 0
            found = view_param_problems(self._view_plan, self.read_ids(shard), params, first)
            if found:
                raise CacheError(
                    f"{self.location}: "
                    + "; ".join(found)
                    + ". "
                    + REPAIR.format(where=self.location)
                )
        return params

    def read_ids(self, shard: int | None = None) -> np.ndarray:
        """(rows,) int64 sample ids of one shard (all rows when ``shard`` is None)."""
        rows = slice(*self.shard_bounds(shard)) if shard is not None else slice(None)
        return self._read("ids", rows)

    def read_row_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) int64 first row and (N,) int32 row count of every sample in the member arrays
        (format 1: one row per sample)."""
        if self.header.version < 2:
            return np.arange(self.n, dtype=np.int64), np.ones(self.n, dtype=np.int32)
        start, count = self._read("row_start", slice(None)), self._read("row_count", slice(None))
        found = row_index_problems(self.header, start, count)
        if found:
            raise CacheError(
                f"{self.location}: " + "; ".join(found) + ". A sample would train on another "
                "sample's rows; the cache was edited. " + REPAIR.format(where=self.location)
            )
        return start, count

    def iter_shards(self, members: list[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for s in self.done_shards(members):
            yield int(s), self.read_logits(int(s), members)

    # -- description
    def info(self) -> CacheInfo:
        done = self.done_shards().tolist()
        sizes = key_sizes(self.store)
        raw = self.header.n_rows * self.num_classes * 4 * len(self.members)
        per_member = {
            m.index: sum(v for k, v in sizes.items() if k.startswith(f"members/{m.index}/"))
            for m in self.members
        }
        return CacheInfo(
            self.location.display, self.header, done, sum(sizes.values()), raw, per_member
        )
