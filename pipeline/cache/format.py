"""The logit cache: a self-describing, resumable, sharded Zarr v3 store of teachers' raw logits.

This module imports without torch (numpy + zarr only), so data tools can read caches.

FORMAT ``kd-pipeline-logit-cache`` version 1
============================================

A Zarr v3 group::

    CACHE/
      zarr.json            group metadata; attributes["kd_cache"] = the JSON header below
      ids                  (N,) int64   stable sample ids of the transfer set
                           (index in the unmodified split)
      labels               (N,) int64   hard labels (only when the transfer set is labeled)
      members/<k>/logits   (N, C) float16|float32   member k's raw logits
                           (no temperature, no softmax)
      members/<k>/done     (S,) uint8   1 once shard s of member k is written; chunk = one shard
      kd-writer.lock       only while a writer runs (names its pid and host;
                           a dead writer's is taken over)
      kd-creating          only while the schema is being created: a store holding it is
                           created afresh

Rows are split into S = ceil(N / R) *shards* of R = ``rows_per_shard`` rows; a shard is exactly one
Zarr chunk of every row-indexed array, so each writer writes whole chunks only and no two writers
ever touch one object. Logit chunks are compressed (zstd) and checksummed (crc32c): a corrupted
chunk fails to read with an error naming the array and the chunk. The ``done`` flags are written
after the shard's data, so an interrupted write is recomputed, never trusted; the header's
``complete`` is set last, then the metadata is consolidated.

Header (``attributes["kd_cache"]``, JSON only, never pickle; read and written as the frozen
:class:`pipeline.cache.header.CacheHeader`, which gives back the same JSON byte for byte)::

    format, version            "kd-pipeline-logit-cache", 1
    n, num_classes, class_names
    rows_per_shard, n_shards
    dtype, codecs              storage dtype ("float16" default) and the codec chain of the
                               logit arrays
    labeled                    whether ``labels`` exists
    dataset                    spec, fingerprint (sha256 of inputs+labels), n, sample_shape,
                               input_stats, ...
    members                    [{index, array, model_spec, checkpoint_sha256, path, metrics,
                                 num_classes, added}]
    tool, tool_version, created, command
    complete, completed_at     true only when every member's every shard is done

FORMAT ``kd-pipeline-logit-cache`` version 2 (what cache-logits writes; version 1 still reads)
========================================================================================

A cache is a table of **rows**: one teacher distribution over C classes per (sample, view,
position). Version 1 is the case of one row per sample; augmentation views and token positions
fill the other two keys. Rows are ordered by sample, then view, then position::

    CACHE/
      zarr.json, ids, labels, kd-writer.lock, kd-creating     as in version 1 (one per sample)
      row_start            (N,) int64   first row of sample i in the member arrays
      row_count            (N,) int32   its rows (views x positions; a sample's rows are
                                        row_start[i] .. row_start[i] + row_count[i] - 1)
      members/<k>/...      the member's row arrays, (R, width) each, by its storage kind
                           (:mod:`pipeline.cache.kinds`): dense ``logits``; topk ``values``,
                           ``indices``, ``tail_lse``; sampled ``values``, ``indices``, ``lse``
      members/<k>/fidelity (S, n_T, 7) float64  what storing lost, measured on seeded rows of
                           each shard at write time (summarised into the header at completion)
      members/<k>/done     (S,) uint8   as in version 1

Shards are still ranges of ``rows_per_shard`` samples; a shard writes rows
``[s * rows.per_shard, (s + 1) * rows.per_shard)``, one chunk of every row array (rows of one
sample never straddle shards). Header additions: ``rows`` = {n (R), per_shard, views, positions},
``seed`` (seeds sampled storage), and per member ``storage`` = {kind, size, temperatures,
sample_temperature, fidelity}. A member's fidelity record holds, per recorded temperature, the
mean and worst KL(full || stored), the mean and least kept mass and the mean and worst total
variation distance. Dense members with one row per sample serve exactly what version 1 served
(the same fingerprint).

**View caches** (``cache-logits --views K --augment SPEC [--include-identity]``): every sample has
K rows, one per augmented view (``rows.views`` = K), and the view's explicit parameters::

      view_params          (R, P) float32  row r's augmentation parameters (numbers, not a seed:
                           shift in pixels, crop offset, flip bit, resized-crop box...), rows
                           ordered like the member rows, chunk = one shard's rows; written at
                           creation with the ids (they depend on no teacher)

The header's ``augment`` = {spec (canonical, every argument spelled out), version (the
transforms' parameter semantics, :data:`pipeline.augment.AUGMENT_VERSION`), params (the P column
names, e.g. ``shift.dy``), transforms, include_identity, draws}; it is absent from caches without
views (their header is unchanged) and part of the fingerprint. View v of sample i is drawn from a
counter-based generator keyed by (header seed, sample id, v) (so resumed and distributed writes
draw the same), and is rebuilt exactly by replaying row i * K + v's parameters on input i
(:meth:`pipeline.augment.Augment.apply`); with ``include_identity`` view 0 is the input itself.

Ensembles keep one array set per member, each with its own support; stage two combines them at
training time: dense members as always; for sparse members the arithmetic mean (``mean-probs``)
averages the members' own bucket losses (cross-entropy is linear in the target, so this is the
gradient of the loss to the members' mixture, using each member's exact buckets), and the
geometric mean (``mean-logits``) of top-k members is formed over the union of their kept classes
with each member's tail spread evenly over its tail classes (one bucket for the classes no member
kept). Sampled members support the arithmetic mean only.

Readers refuse a partial cache unless asked to allow it (then only the shards every chosen member
has finished are used). Values are raw logits: temperature, ensemble mean type and member subset are
chosen at training time.

Every ``ids``, ``labels`` and logits chunk is stored, even one equal to the fill value, so
:class:`LogitCache` reads a missing one as damage (``MissingChunkError``), never as zarr's fill
value. It also refuses arrays whose shapes disagree with the header, non-finite logits, labels
outside ``0..C-1`` (or unlike the dataset's, when the caller gives them) and a complete header with
a done flag missing or zero; and it reads the done flags once, so one reader serves one snapshot.
Every member shard it serves passes its storage kind's checks (:meth:`StorageKind.check`), and the
row index and views' parameters are re-derived from the header and compared
(:mod:`pipeline.cache.rows`): the same checks ``cache verify`` runs, so no reader trains on a row
that ``verify`` would flag.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from pipeline import __version__
from pipeline.cache.header import (
    ATTR_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    VIEW_PARAMS,
    CacheHeader,
    DatasetRecord,
    MemberRecord,
    expected_arrays,
    member_array,
    member_done,
    member_fidelity,
    member_row_arrays,
    validate_header,
)
from pipeline.cache.kinds import (
    FIDELITY_FIELDS,
    StorageSpec,
    as_dtype,
    bytes_per_row,
    measure_fidelity,
    summarise_fidelity,
)
from pipeline.cache.location import (
    COPY_MARKER,
    MAX_METADATA_BYTES,
    CacheLocation,
    CacheLock,
    delete_key,
    key_sizes,
    list_keys,
    local_path,
    put_bytes,
    refuse_unfinished_copy,
)
from pipeline.cache.rows import row_index_problems, view_param_problems, view_plan
from pipeline.data.content import CONTENT_DIGESTS, CONTENT_KEY, DIGEST_BYTES, DIGESTS_ARRAY
from pipeline.errors import CacheError, KDError

__all__ = [  # the format's names, including those defined in header.py and location.py
    "ATTR_KEY",
    "CREATING_MARKER",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "CacheHeader",
    "CacheInfo",
    "CacheLock",
    "DatasetRecord",
    "LogitCache",
    "MemberRecord",
    "MissingChunkError",
    "VIEW_PARAMS",
    "add_member_arrays",
    "array_handle",
    "cache_fingerprint",
    "check_metadata_size",
    "create_cache",
    "expected_arrays",
    "logit_codecs",
    "mark_complete",
    "member_array",
    "member_done",
    "read_header",
    "remove_partial_files",
    "shard_bounds",
    "validate_header",
    "write_shard",
    "write_shards",
]

FLOAT16_MAX = float(np.finfo(np.float16).max)
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


def _set_header(group: zarr.Group, header: CacheHeader) -> None:
    group.attrs[ATTR_KEY] = header.to_dict()  # attrs are stored as a whole: assign the whole header


# ------------------------------------------------------------------------------------------- create
def create_cache(
    location: str | Path | CacheLocation,
    *,
    dataset: dict,
    ids: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    class_names: Sequence[str],
    members: Sequence[Mapping[str, Any]],
    dtype: str,
    rows_per_shard: int,
    command: str,
    storage: StorageSpec | Sequence[StorageSpec] | None = None,
    seed: int = 0,
    views: int = 1,
    augment: Mapping[str, Any] | None = None,
    view_params: np.ndarray | None = None,
    positions: int = 1,
) -> zarr.Group:
    """Create the store schema-first: every array at full size, ids/labels written, no logits yet.

    Args:
        location: a directory or an object-store URL (see :mod:`pipeline.cache.location`).
        dataset: the transfer set's ``Dataset.describe()``.
        ids: (N,) stable sample ids. labels: (N,) or None.
        members: teacher identities (``LoadedModel.identity()``), one per member.
        storage: how the members' rows are stored (one spec for all, or one per member;
            default dense).
        seed: seeds sampled storage (with the member and the shard) and the views' draws.
        positions: rows per view (token positions of a sequence dataset).
        views: rows per sample (augmented views of each input).
        augment: a view cache's ``augment`` header record (spec, version, parameter schema).
        view_params: (N * views, P) float32, each view's explicit parameters (with ``augment``):
            written here, with the ids, since they depend on no teacher.
    """
    if (augment is None) != (view_params is None):
        raise CacheError("a view cache needs both its augment record and its view parameters")
    where = CacheLocation.parse(location)
    store = _clear_for_creation(where)
    n = int(ids.shape[0])
    header = CacheHeader.new(
        n=n,
        num_classes=int(num_classes),
        class_names=list(class_names),
        rows_per_shard=int(rows_per_shard),
        dtype=dtype,
        codecs=codecs_description(),
        labeled=labels is not None,
        dataset=dataset,
        tool_version=__version__,
        created=now(),
        command=command,
        seed=int(seed),
        views=int(views),
        augment=augment,
        positions=int(positions),
    )
    if storage is None or isinstance(storage, StorageSpec):
        storage = [storage or StorageSpec("dense")] * len(members)
    group = zarr.create_group(store, zarr_format=3)
    # Every chunk is stored, even one equal to the fill value (an all-class-0 labels shard): a
    # present object per shard is what verify and copy check, and a missing one then always means
    # damage.
    kw = {
        "chunks": (rows_per_shard,),
        "compressors": logit_codecs(),
        "config": {"write_empty_chunks": True},
    }
    group.create_array("ids", data=np.asarray(ids, dtype=np.int64), **kw)
    if labels is not None:
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), **kw)
    per_sample = header.shard_rows // header.rows_per_shard
    group.create_array("row_start", data=np.arange(n, dtype=np.int64) * per_sample, **kw)
    group.create_array("row_count", data=np.full(n, per_sample, dtype=np.int32), **kw)
    if dataset.get(CONTENT_KEY) == CONTENT_DIGESTS:
        # A lazy dataset's per-sample content digests, written with each shard (stage one hashes
        # the inputs it decodes anyway); filled with zeros until then.
        group.create_array(
            DIGESTS_ARRAY,
            shape=(n, DIGEST_BYTES),
            dtype="uint8",
            chunks=(rows_per_shard, DIGEST_BYTES),
            compressors=logit_codecs(),
            config={"write_empty_chunks": True},
        )
    if view_params is not None:
        params = np.asarray(view_params, dtype=np.float32)
        if params.shape != (header.n_rows, len(header.view_params or ())):
            raise CacheError(
                f"view parameters of shape {params.shape}, expected "
                f"({header.n_rows}, {len(header.view_params or ())})"
            )
        group.create_array(
            VIEW_PARAMS, data=params, **{**kw, "chunks": (header.shard_rows, params.shape[1])}
        )
    _set_header(group, header)
    for m, spec in zip(members, storage, strict=True):
        add_member_arrays(group, m, spec)
    delete_key(store, CREATING_MARKER)
    return group


def _clear_for_creation(where: CacheLocation) -> Store:
    """Mark ``where`` as being created and clear an interrupted creation; returns its store.

    Until the schema is whole the marker stays, so a kill before then leaves a store that is created
    afresh. The writer lock is never removed.
    """
    if where.kind == "dir":
        root = local_path(where.text)
        root.mkdir(parents=True, exist_ok=True)
        (root / CREATING_MARKER).touch()
        for child in root.iterdir():
            if child.name != CREATING_MARKER and not child.name.startswith(CacheLock.NAME):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return where.open("w")
    store = where.open("w")
    put_bytes(store, CREATING_MARKER, b"")  # the same protocol, as an object
    for key in list_keys(store):
        if key != CREATING_MARKER and not key.startswith(CacheLock.NAME):
            delete_key(store, key)
    return store


def add_member_arrays(
    group: zarr.Group, identity: Mapping[str, Any], storage: StorageSpec | None = None
) -> MemberRecord:
    """Append a member to the header and create its (empty) row, done and fidelity arrays.

    Args:
        storage: how its rows are stored (default dense); a format 1 cache takes dense only.
    """
    h = group_header(group)
    index = len(h.members)
    spec = storage or StorageSpec("dense")
    entry = {"index": index, "array": member_array(index, _first_array(spec)), **identity}
    entry["added"] = now()
    if h.version >= 2:
        entry["storage"] = spec.to_dict()
    elif spec.sparse:
        raise CacheError(
            f"a format {h.version} cache stores dense members only; write {spec.text} members "
            "into a new cache (cache-logits --store ... --out NEW)"
        )
    h = h.with_member(entry)
    # overwrite: arrays at this index that the header does not list are leftovers of an add killed
    # midway.
    for name, shape, dtype, chunks in member_row_arrays(h, index):
        group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            compressors=logit_codecs(),
            fill_value=0,
            overwrite=True,
        )
    if h.version >= 2:
        temps, fields = len(spec.temperatures), len(FIDELITY_FIELDS)
        group.create_array(
            member_fidelity(index),
            shape=(h.n_shards, temps, fields),
            dtype="float64",
            chunks=(1, temps, fields),
            compressors=[zc.Crc32cCodec()],
            fill_value=0,
            overwrite=True,
        )
    # One chunk per flag: writers of different shards never share an object.
    group.create_array(
        member_done(index),
        shape=(h.n_shards,),
        dtype="uint8",
        chunks=(1,),
        compressors=[zc.Crc32cCodec()],
        fill_value=0,
        overwrite=True,
    )
    _set_header(group, h)
    return h.members[-1]


def _first_array(spec: StorageSpec) -> str:
    return spec.impl.arrays(spec, 2, "float16")[0][0]


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
    _set_header(group, h.completed(now()))
    zarr.consolidate_metadata(store)


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
            f"{_ids_list(_row_ids(h, shard, ids, bad))}; the teacher is broken on these inputs, "
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
                f"{_ids_list(_row_ids(h, shard, ids, over))}; they would be stored as inf. "
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


def _row_ids(h: CacheHeader, shard: int, ids: np.ndarray, bad_rows: np.ndarray) -> np.ndarray:
    """The sample ids of the flagged rows of a shard (rows of one sample are consecutive)."""
    per_sample = max(1, h.shard_rows // h.rows_per_shard)
    return np.unique(ids[np.flatnonzero(bad_rows) // per_sample])


def _ids_list(ids: np.ndarray, limit: int = 20) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return f"[{shown}{', ...' if ids.size > limit else ''}] ({ids.size} in all)"


# ------------------------------------------------------------------------------------------- reader
def describe_rows(samples: int, views: int = 1, positions: int = 1) -> str:
    """How many rows a cache holds and what they are, e.g. ``"8000 rows (2000 samples x 4
    views)"``: the row count alone would hide that a view or token cache has several per sample.
    """
    per_sample = views * positions
    if per_sample == 1:
        return f"{samples} rows"
    parts = [f"{samples} {'sequences' if positions > 1 else 'samples'}"]
    if views > 1:
        parts.append(f"{views} views")
    if positions > 1:
        parts.append(f"{positions} token positions")
    return f"{samples * per_sample} rows ({' x '.join(parts)})"


@dataclass
class CacheInfo:
    """What ``cache info`` prints."""

    location: str
    header: CacheHeader
    shards_done: list[int]
    size_on_disk: int
    raw_size: int
    member_bytes: dict[int, int] | None = None  # bytes on disk of each member's arrays

    def to_dict(self) -> dict:
        h = self.header
        dataset = h.dataset.to_dict()
        return {
            "location": self.location,
            "format": h.format,
            "version": h.version,
            "n": h.n,
            "num_classes": h.num_classes,
            "class_names": list(h.class_names),
            "dtype": h.dtype,
            "codecs": None if h.codecs is None else list(h.codecs),
            "rows_per_shard": h.rows_per_shard,
            "n_shards": h.n_shards,
            "shards_done": self.shards_done,
            "complete": h.complete,
            "labeled": h.labeled,
            "rows": h.n_rows,
            "views": h.views,
            "positions": 1 if h.rows is None else int(h.rows["positions"]),
            "augment": None if h.augment is None else h.augment["spec"],
            "include_identity": None if h.augment is None else h.augment.get("include_identity"),
            "members": [self._member(m) for m in h.members],
            "dataset": {
                k: dataset.get(k) for k in ("spec", "fingerprint", "n", "sample_shape", "labeled")
            },
            "size_on_disk": self.size_on_disk,
            "raw_float32_size": self.raw_size,
            "created": h.created,
            "completed_at": h.completed_at,
            "command": h.command,
            "tool_version": h.tool_version,
        }

    def _member(self, m: MemberRecord) -> dict:
        """A member's identity, its storage, bytes per row and what storing lost."""
        h = self.header
        keys = ("index", "model_spec", "checkpoint_sha256", "path", "metrics")
        out = {k: m.to_dict().get(k) for k in keys}
        spec = m.spec
        dense_row = h.num_classes * np.dtype(h.dtype).itemsize
        raw_row = bytes_per_row(spec, h.num_classes, h.dtype)
        out["storage"] = spec.text
        out["temperatures"] = list(spec.temperatures) if spec.sparse else None
        out["raw_bytes_per_row"] = raw_row
        out["dense_bytes_per_row"] = dense_row
        if self.member_bytes is not None and h.n_rows:
            on_disk = self.member_bytes.get(m.index, 0) / h.n_rows
            out["bytes_per_row_on_disk"] = round(on_disk, 2)
            out["ratio_to_dense"] = round(on_disk / dense_row, 5)
        out["fidelity"] = None if spec.fidelity is None else dict(spec.fidelity)
        return out


# A chunk of these arrays is always written (ids and labels at creation, logits before their
# shard's done flag), so its absence is damage; a done flag's chunk is legitimately absent until
# its shard is written.
_DATA_CHUNK = re.compile(
    r"(ids|labels|row_start|row_count|view_params|members/\d+/(?!done/)[a-z_]+)/c/"
)
_REPAIR = (
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


class _AbsentChunk(Exception):
    """Raised inside zarr's read by :class:`_NoFillStore`; :meth:`LogitCache._read` reports it."""


class _NoFillStore(WrapperStore):
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
            raise _AbsentChunk(key)
        return buf


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
                _NoFillStore(self.store), mode="r", use_consolidated=False, zarr_format=3
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
                + _REPAIR.format(where=self.location)
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
                "using it would silently train on fewer rows. "
                + _REPAIR.format(where=self.location)
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
                + _REPAIR.format(where=self.location)
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
        except _AbsentChunk as e:
            raise self._missing(str(e), path) from None
        except Exception as e:  # checksum mismatch, decompression failure, truncated object
            chunk = _chunk_of(sel, arr.chunks)
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
            "served as zarr's fill value. " + _REPAIR.format(where=self.location),
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
        problem = _cheap_problem(out, self.num_classes)
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
                    "gave. " + _REPAIR.format(where=self.location)
                )
        if problem:
            bad = _bad_rows(out, self.num_classes)
            raise CacheError(
                f"{self.location}: member {member}'s {problem[0]} in shard {shard} "
                f"{problem[1]} for sample ids "
                f"{_ids_list(_row_ids(self.header, shard, self.read_ids(shard), bad))}. "
                "cache-logits never stores them, so the chunk was altered; training on it would "
                "diverge or learn nothing there. " + _REPAIR.format(where=self.location)
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
                f"{_ids_list(ids, 5)} {what}: they were altered. "
                + _REPAIR.format(where=self.location)
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
                "never stores them, so the chunk was altered. "
                + _REPAIR.format(where=self.location)
            )
        if "_view_plan" not in self.__dict__:
            self._view_plan = view_plan(self.header)
        if self._view_plan is not None:
            first = rows.start or 0
            found = view_param_problems(self._view_plan, self.read_ids(shard), params, first)
            if found:
                raise CacheError(
                    f"{self.location}: " + "; ".join(found) + ". "
                    + _REPAIR.format(where=self.location)
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
                "sample's rows; the cache was edited. " + _REPAIR.format(where=self.location)
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


def _cheap_problem(arrays: dict[str, np.ndarray], num_classes: int) -> tuple[str, str] | None:
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


def _bad_rows(arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """(rows,) bool: the rows :func:`_cheap_problem` objects to."""
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


def _chunk_of(sel: Any, chunks: tuple[int, ...]) -> tuple[int, ...]:
    start = sel.start if isinstance(sel, slice) and sel.start is not None else 0
    return (start // chunks[0],) + (0,) * (len(chunks) - 1)


def check_metadata_size(store: Store, where: str) -> None:
    """Refuse a root ``zarr.json`` over ``MAX_METADATA_BYTES`` before zarr parses it."""
    try:
        size = sync(store.getsize("zarr.json"))
    except (FileNotFoundError, KeyError):
        return  # nothing to parse; the open that follows says what is missing
    except Exception:  # noqa: BLE001 - a store that cannot tell sizes: zarr's own parsing still validates
        return
    if size > MAX_METADATA_BYTES:
        raise CacheError(
            f"{where}: zarr.json is {size} bytes, over the {MAX_METADATA_BYTES}-byte "
            "limit for cache metadata; this is not a kd-pipeline cache (or it was "
            "tampered with). Refusing to parse it"
        )


def read_header(location: str | Path | CacheLocation) -> CacheHeader | None:
    """The header of an existing cache at ``location`` (validated), or None if nothing is there."""
    where = CacheLocation.parse(location)
    if where.kind == "dir":
        p = local_path(where.text)
        if not p.exists():
            return None
        if p.is_dir():
            names = {c.name for c in p.iterdir() if not c.name.startswith(CacheLock.NAME)}
            if not names or CREATING_MARKER in names:
                return None  # empty, or a creation that was interrupted: (re-)created by the writer
            if COPY_MARKER in names:
                refuse_unfinished_copy(where.open("r"), where.display)
        if not (p / "zarr.json").is_file():
            raise CacheError(
                f"{where}: exists but is not a Zarr store; choose another --out or remove it"
            )
        store = where.open("r")
    else:
        if not where.exists():
            return None
        store = where.open("r")
        names = {k for k in list_keys(store) if not k.startswith(CacheLock.NAME)}
        if not names or CREATING_MARKER in names:
            return None
        if COPY_MARKER in names:
            refuse_unfinished_copy(store, where.display)
        if "zarr.json" not in names:
            raise CacheError(
                f"{where}: holds objects but no zarr.json (not a Zarr store, or a "
                "copy that did not finish: re-run `kd-pipeline cache copy` to "
                "complete it); choose another --out"
            )
    check_metadata_size(store, where.display)
    group = zarr.open_group(store, mode="r", use_consolidated=False, zarr_format=3)
    return group_header(group, where.display)


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


def cache_fingerprint(
    header: CacheHeader | Mapping[str, Any], members: list[int] | None = None
) -> str:
    """Identity of a cache's content (:meth:`CacheHeader.fingerprint`); takes a header dict too."""
    if not isinstance(header, CacheHeader):
        header = CacheHeader.from_dict(dict(header))
    return header.fingerprint(members)
