"""Writing a cache's shards: each member-shard's data, then its done flag; completion last.

Stage one's driver, which decides what to write, is :mod:`pipeline.cache.writer`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.cache.header import CacheHeader, member_array, member_done, member_fidelity
from pipeline.cache.kinds import as_dtype, measure_fidelity, summarise_fidelity
from pipeline.cache.layout import (
    array_handle,
    group_header,
    ids_list,
    now,
    row_ids,
    set_header,
    shard_bounds,
)
from pipeline.cache.location import CacheLocation, local_path
from pipeline.data.content import DIGESTS_ARRAY
from pipeline.errors import CacheError

FLOAT16_MAX = float(np.finfo(np.float16).max)


def write_digests(
    group: zarr.Group,
    shard: int,
    digests: np.ndarray,
    handles: dict | None = None,
    header: CacheHeader | None = None,
) -> None:
    """Write one shard's (rows, DIGEST_BYTES) input digests (before its members' done flags)."""
    h = header if header is not None else group_header(group)
    store_arrays(group, [digest_write(h, shard, digests)], {} if handles is None else handles)


# One array write: (array path, basic selection, values).
ArrayWrite = tuple[str, Any, Any]


def digest_write(h: CacheHeader, shard: int, digests: np.ndarray) -> ArrayWrite:
    """The write of one shard's (rows, DIGEST_BYTES) input digests."""
    start, stop = shard_bounds(shard, h.rows_per_shard, h.n)
    return DIGESTS_ARRAY, slice(start, stop), digests


def store_arrays(group: zarr.Group, writes: Sequence[ArrayWrite], handles: dict) -> None:
    """Carry out ``writes`` together and return once every one is stored.

    One round trip to zarr's event loop for all of them (compression and stores run concurrently
    there) instead of one per array: per member-shard the writer stores its rows, its fidelity
    and, after both, its done flag.
    """
    if not writes:
        return
    arrays = [(array_handle(group, path, handles), sel, values) for path, sel, values in writes]
    if len(arrays) == 1:
        arr, sel, values = arrays[0]
        arr[sel] = values
        return

    async def together() -> None:
        await asyncio.gather(*(arr.async_array.setitem(sel, v) for arr, sel, v in arrays))

    sync(together())


def write_shard(
    group: zarr.Group,
    member: int,
    shard: int,
    logits: np.ndarray,
    ids: np.ndarray,
    handles: dict | None = None,
    header: CacheHeader | None = None,
) -> None:
    """Write one whole shard of one member, stored by its kind, then its done flag.

    Args:
        logits: (rows, C) float32 raw logits for the shard's rows.
        ids: (samples,) sample ids of the shard, named in errors.
        handles: array handles kept across calls by a writer of many shards (see
            :func:`array_handle`).
        header: the cache's header, when the caller holds it (else read from ``group``).

    Raises:
        CacheError: NaN/inf logits, or stored logits beyond float16's range in a float16 cache
            (nothing is written).
    """
    write_shards(group, [(member, shard, logits, ids)], handles=handles, header=header)


def write_shards(
    group: zarr.Group,
    items: Sequence[tuple[int, int, np.ndarray, np.ndarray]],
    extra: Sequence[ArrayWrite] = (),
    handles: dict | None = None,
    header: CacheHeader | None = None,
) -> None:
    """Write several member-shards: every one's data (and ``extra``, such as input digests) in one
    go, and only once all of it is stored, their done flags in a second.

    A done flag is therefore never stored before its shard's data: a writer killed in between
    leaves data without a flag, which a resumed run recomputes.

    Args:
        items: ``(member, shard, logits, ids)`` as for :func:`write_shard`.
        extra: writes that must precede the flags too (:func:`digest_write`).

    Raises:
        CacheError: as :func:`write_shard`, for the first refused item; the items before it (and
            ``extra``) are still written, with their flags; nothing of it or after it.
    """
    h = header if header is not None else group_header(group)
    handles = {} if handles is None else handles
    writes, flags = list(extra), []
    refused = None
    for member, shard, logits, ids in items:
        try:
            writes += shard_writes(h, member, shard, logits, ids)
        except CacheError as e:
            refused = e
            break
        flags.append((member_done(member), shard, 1))
    store_arrays(group, writes, handles)
    store_arrays(group, flags, handles)
    if refused is not None:
        raise refused


def shard_writes(
    h: CacheHeader, member: int, shard: int, logits: np.ndarray, ids: np.ndarray
) -> list[ArrayWrite]:
    """Check and encode one member-shard: the array writes of its data (not its done flag).

    Args:
        logits: (rows, C) float32 raw logits for the shard's rows.
        ids: (samples,) sample ids of the shard, named in errors.

    Raises:
        CacheError: as :func:`write_shard`.
    """
    # Each row's largest |logit| (NaN where the row holds one): one pass over the shard answers
    # both checks below (a non-finite row; a stored value beyond float16).
    peak = np.maximum(logits.max(axis=1), -logits.min(axis=1))
    bad = ~np.isfinite(peak)
    if bad.any():
        raise CacheError(
            f"member {member} produced NaN or inf logits for sample ids "
            f"{ids_list(row_ids(h, shard, ids, bad))}; the teacher is broken on these inputs, "
            "nothing was written for this shard"
        )
    start, stop = h.row_bounds(shard)
    if logits.shape != (stop - start, h.num_classes):
        raise CacheError(
            f"shard {shard} of member {member}: expected logits of shape "
            f"{(stop - start, h.num_classes)}, got {logits.shape}"
        )
    spec = h.storage(member)
    if h.dtype == "float16":
        # Only what is stored must fit: a top-k member keeps its K largest values, and its tail
        # is summed in float64 whatever its range; either way a row's largest |value| decides.
        over = peak > FLOAT16_MAX
        if over.any():
            raise CacheError(
                f"member {member} has logits beyond float16's range (|v| > {FLOAT16_MAX:.0f}, max "
                f"{np.abs(logits).max():.4g}) for sample ids "
                f"{ids_list(row_ids(h, shard, ids, over))}; they would be stored as inf. "
                "Re-create the cache with --dtype float32"
            )
    rows = slice(start, stop)
    if h.version < 2:
        return [(member_array(member), rows, as_dtype(logits, h.dtype))]
    # Seeded by (cache seed, member, shard): a resumed or distributed write draws the same.
    rng = np.random.default_rng([h.seed or 0, member, shard])
    arrays = spec.impl.encode(spec, logits, h.dtype, rng)
    fidelity = measure_fidelity(
        spec, logits, arrays, np.random.default_rng([h.seed or 0, member, shard, 1])
    )
    return [
        *((member_array(member, name), rows, values) for name, values in arrays.items()),
        (member_fidelity(member), shard, fidelity),
    ]


def mark_complete(location: str | Path | CacheLocation) -> None:
    """Set ``complete`` (after verifying every done flag) and consolidate the metadata, in that
    order."""
    where = CacheLocation.parse(location)
    store = where.open("w")
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    h = group_header(group, where.display)
    for m in h.members:
        flags = group[member_done(m.index)][:]
        if not flags.all():
            raise CacheError(
                f"{where}: member {m.index} still misses {int((flags == 0).sum())} shards"
            )
        if h.version >= 2:  # the shards' fidelity measurements, summarised once
            per_shard = group[member_fidelity(m.index)][:]
            spec = h.storage(m.index)
            record = {**spec.to_dict(), "fidelity": summarise_fidelity(spec, per_shard)}
            h = h.with_storage(m.index, record)
    set_header(group, h.completed(now()))
    zarr.consolidate_metadata(store)


def remove_partial_files(location: str | Path | CacheLocation) -> int:
    """Delete leftovers of writes interrupted by a kill (zarr's ``*.partial`` temp files); returns
    how many.

    Only local directories have them: an object store's PUT is atomic.
    """
    where = CacheLocation.parse(location)
    if where.kind != "dir":
        return 0
    count = 0
    for f in local_path(where.text).rglob("*.partial"):
        f.unlink(missing_ok=True)
        count += 1
    return count
