"""What the reader checks on the bytes it serves, and the advice its errors end with.

It refuses missing data chunks, non-finite values and class indices out of range."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from pipeline.errors import CacheError

# A chunk of these arrays is always written (ids and labels at creation, logits before their
# shard's done flag), so its absence is damage; a done flag's chunk is legitimately absent until
# its shard is written.
_DATA_CHUNK = re.compile(
    r"(ids|labels|row_start|row_count|view_params|members/\d+/(?!done/)[a-z_]+)/c/"
)


REPAIR = (
    "Run `kd-pipeline cache verify {where}` for a full report, then restore the cache "
    "from a good copy (`kd-pipeline cache copy`) or re-create it with `kd-pipeline "
    "cache-logits` into a fresh --out (a resume trusts the done flags, so it would not "
    "redo this shard)"
)


class MissingChunkError(CacheError):
    """A data chunk (ids, labels or logits) has no object in the store.

    Attributes:
        key: the chunk's store key, e.g. ``members/0/logits/c/4/0``.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class AbsentChunk(Exception):
    """Raised inside zarr's read by :class:`NoFillStore`; :meth:`LogitCache._read` reports it."""


class NoFillStore(WrapperStore):
    """A store view in which reading a missing data chunk fails instead of giving the fill value.

    zarr treats a chunk without an object as all fill value (sparse arrays); for a cache that
    would turn a deleted logits chunk into uniform targets and a deleted labels chunk into class 0.
    Checking the ``get`` that zarr makes anyway costs nothing on any store (no extra request,
    unlike ``exists``).
    """

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is None and _DATA_CHUNK.match(key):
            raise AbsentChunk(key)
        return buf


def cheap_problem(arrays: dict[str, np.ndarray], num_classes: int) -> tuple[str, str] | None:
    """(array, what is wrong) by what the reader checks on every shard it serves (``cache
    verify`` checks more); None when nothing is."""
    for name in ("logits", "values"):
        if name in arrays and not _all_finite(arrays[name]):
            return name, "hold NaN or inf"
    idx = arrays.get("indices")
    if idx is not None and idx.size and int(idx.max()) >= num_classes:
        return "indices", f"hold classes outside 0..{num_classes - 1}"
    for name in ("tail_lse", "lse"):
        if name in arrays and np.isnan(arrays[name]).any():
            return name, "hold NaN"
    return None


def bad_rows(arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """(rows,) bool: the rows :func:`cheap_problem` objects to."""
    rows = next(iter(arrays.values())).shape[0]
    bad = np.zeros(rows, dtype=bool)
    for name, a in arrays.items():
        if name == "indices":
            bad |= (a.astype(np.int64) >= num_classes).any(axis=1)
        elif name in ("tail_lse", "lse"):
            bad |= np.isnan(a).any(axis=1)
        else:
            bad |= ~np.isfinite(a.astype(np.float32)).all(axis=1)
    return bad


def _all_finite(block: np.ndarray) -> bool:
    """Whether a logits block holds no NaN or inf, for float16 without a float conversion.

    float16 NaN/inf are exactly the values whose magnitude bits are >= 0x7C00 (exponent all
    ones): one integer max is ~25x faster than ``np.isfinite`` on float16, which would cost as
    much as decoding the shard.
    """
    if block.dtype == np.float16:
        return block.size == 0 or int((block.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    return bool(np.isfinite(block).all())


def chunk_of(sel: Any, chunks: tuple[int, ...]) -> tuple[int, ...]:
    start = sel.start if isinstance(sel, slice) and sel.start is not None else 0
    return (start // chunks[0],) + (0,) * (len(chunks) - 1)
