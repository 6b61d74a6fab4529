"""The logit cache's layout: its markers, codecs, shard bounds and header attribute.

The format is specified in docs/cache-format.md.

This module imports without torch (numpy + zarr only), as does every reader of a cache.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import zarr
import zarr.codecs as zc

from pipeline.cache.header import ATTR_KEY, CacheHeader

ZSTD_LEVEL = 3

CREATING_MARKER = (
    "kd-creating"  # present while a cache is being created: a store with it is unfinished
)

# Consolidated metadata is a zarr-python extension; we use it deliberately (fewer reads from object
# stores).
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
# Our writer lock lives in the store while the metadata is consolidated; zarr notes it is not a zarr
# object.
warnings.filterwarnings("ignore", message="Object at kd-writer.lock")


def now() -> str:
    """The timestamp format of the header's ``created``, ``added`` and ``completed_at``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def logit_codecs() -> list:
    """Bytes-to-bytes codecs of the logit arrays: zstd, then a crc32c checksum over the compressed
    bytes."""
    return [zc.ZstdCodec(level=ZSTD_LEVEL), zc.Crc32cCodec()]


def codecs_description() -> list[str]:
    return ["bytes(little-endian)", f"zstd(level={ZSTD_LEVEL})", "crc32c"]


def shard_bounds(shard: int, rows_per_shard: int, n: int) -> tuple[int, int]:
    """Row range [start, stop) of ``shard``."""
    start = shard * rows_per_shard
    return start, min(start + rows_per_shard, n)


def group_header(group: zarr.Group, where: str = "cache") -> CacheHeader:
    """The (validated) header of an open cache group."""
    return CacheHeader.from_dict(group.attrs.get(ATTR_KEY), where)


def set_header(group: zarr.Group, header: CacheHeader) -> None:
    group.attrs[ATTR_KEY] = header.to_dict()  # attrs are stored as a whole: assign the whole header


def array_handle(group: zarr.Group, path: str, handles: dict) -> zarr.Array:
    """``group[path]``, opened once per ``handles`` dict.

    Opening an array reads and parses its metadata; per shard read or write that would dominate
    small shards. A handle is plain metadata (no file handles), so holders stay fork-safe.
    """
    if path not in handles:
        arr = group[path]
        # The write_empty_chunks choice is a runtime setting in zarr 3, not metadata: apply it on
        # every open.
        handles[path] = (
            arr.with_config({"write_empty_chunks": True}) if isinstance(arr, zarr.Array) else arr
        )
    return handles[path]


def row_ids(h: CacheHeader, shard: int, ids: np.ndarray, bad_rows: np.ndarray) -> np.ndarray:
    """The sample ids of the flagged rows of a shard (rows of one sample are consecutive)."""
    per_sample = max(1, h.shard_rows // h.rows_per_shard)
    return np.unique(ids[np.flatnonzero(bad_rows) // per_sample])


def ids_list(ids: np.ndarray, limit: int = 20) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return f"[{shown}{', ...' if ids.size > limit else ''}] ({ids.size} in all)"
