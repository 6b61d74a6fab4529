"""The logit cache: a self-describing, resumable, sharded Zarr v3 store of teachers' raw logits.

This module imports without torch (numpy + zarr only), so data tools can read caches.

FORMAT ``kd-pipeline-logit-cache`` version 1
============================================

A Zarr v3 group::

    CACHE/
      zarr.json                  group metadata; attributes["kd_cache"] = the JSON header below
      ids                        (N,) int64   stable sample ids of the transfer set (index in the unmodified split)
      labels                     (N,) int64   hard labels (only when the transfer set is labeled)
      members/<k>/logits         (N, C) float16|float32   member k's raw logits (no temperature, no softmax)
      members/<k>/done           (S,) uint8   1 once shard s of member k is written; chunk = one shard
      kd-writer.lock             only while a writer runs (names its pid and host; a dead writer's is taken over)
      kd-creating                only while the schema is being created: a store holding it is created afresh

Rows are split into S = ceil(N / R) *shards* of R = ``rows_per_shard`` rows; a shard is exactly one Zarr chunk
of every row-indexed array, so each writer writes whole chunks only and no two writers ever touch one object.
Logit chunks are compressed (zstd) and checksummed (crc32c): a corrupted chunk fails to read with an error naming
the array and the chunk. The ``done`` flags are written after the shard's data, so an interrupted write is
recomputed, never trusted; the header's ``complete`` is set last, then the metadata is consolidated.

Header (``attributes["kd_cache"]``, JSON only, never pickle)::

    format, version            "kd-pipeline-logit-cache", 1
    n, num_classes, class_names
    rows_per_shard, n_shards
    dtype, codecs              storage dtype ("float16" default) and the codec chain of the logit arrays
    labeled                    whether ``labels`` exists
    dataset                    spec, fingerprint (sha256 of inputs+labels), n, sample_shape, input_stats, ...
    members                    [{index, array, model_spec, checkpoint_sha256, path, metrics, num_classes, added}]
    tool, tool_version, created, command
    complete, completed_at     true only when every member's every shard is done

Readers refuse a partial cache unless asked to allow it (then only the shards every chosen member has finished
are used). Values are raw logits: temperature, ensemble mean type and member subset are chosen at training time.
"""
from __future__ import annotations

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
from zarr.abc.store import Store
from zarr.core.sync import sync

from pipeline import __version__
from pipeline.cache.header import (
    ATTR_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    CacheHeader,
    DatasetRecord,
    MemberRecord,
    validate_header,
)
from pipeline.cache.location import (
    MAX_METADATA_BYTES,
    CacheLocation,
    CacheLock,
    delete_key,
    key_sizes,
    list_keys,
    local_path,
    put_bytes,
)
from pipeline.errors import CacheError

__all__ = [  # the format's names, including those defined in header.py and location.py
    "ATTR_KEY", "CREATING_MARKER", "FORMAT_NAME", "FORMAT_VERSION", "MAX_HEADER_BYTES", "CacheHeader",
    "CacheInfo", "CacheLock", "DatasetRecord", "LogitCache", "MemberRecord", "add_member_arrays",
    "array_handle", "cache_fingerprint", "check_metadata_size", "create_cache", "logit_codecs",
    "mark_complete", "member_array", "member_done", "read_header", "remove_partial_files",
    "shard_bounds", "validate_header", "write_shard",
]

FLOAT16_MAX = float(np.finfo(np.float16).max)
ZSTD_LEVEL = 3

CREATING_MARKER = "kd-creating"  # present while a cache is being created: a store with it is unfinished

# Consolidated metadata is a zarr-python extension; we use it deliberately (fewer reads from object stores).
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
# Our writer lock lives in the store while the metadata is consolidated; zarr notes it is not a zarr object.
warnings.filterwarnings("ignore", message="Object at kd-writer.lock")


def now() -> str:
    """The timestamp format of the header's ``created``, ``added`` and ``completed_at``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def logit_codecs() -> list:
    """Bytes-to-bytes codecs of the logit arrays: zstd, then a crc32c checksum over the compressed bytes."""
    return [zc.ZstdCodec(level=ZSTD_LEVEL), zc.Crc32cCodec()]


def codecs_description() -> list[str]:
    return ["bytes(little-endian)", f"zstd(level={ZSTD_LEVEL})", "crc32c"]


def shard_bounds(shard: int, rows_per_shard: int, n: int) -> tuple[int, int]:
    """Row range [start, stop) of ``shard``."""
    start = shard * rows_per_shard
    return start, min(start + rows_per_shard, n)


def member_array(index: int) -> str:
    return f"members/{index}/logits"


def member_done(index: int) -> str:
    return f"members/{index}/done"


def group_header(group: zarr.Group, where: str = "cache") -> CacheHeader:
    """The (validated) header of an open cache group."""
    return CacheHeader.from_dict(group.attrs.get(ATTR_KEY), where)


def _set_header(group: zarr.Group, header: CacheHeader) -> None:
    group.attrs[ATTR_KEY] = header.to_dict()  # attrs are stored as a whole: assign the whole header


# ------------------------------------------------------------------------------------------------------ create
def create_cache(location: str | Path | CacheLocation, *, dataset: dict, ids: np.ndarray,
                 labels: np.ndarray | None, num_classes: int, class_names: Sequence[str],
                 members: Sequence[Mapping[str, Any]], dtype: str, rows_per_shard: int,
                 command: str) -> zarr.Group:
    """Create the store schema-first: every array at full size, ids/labels written, no logits yet.

    Args:
        location: a directory or an object-store URL (see :mod:`pipeline.cache.location`).
        dataset: the transfer set's ``Dataset.describe()``.
        ids: (N,) stable sample ids. labels: (N,) or None.
        members: teacher identities (``LoadedModel.identity()``), one per member.
    """
    where = CacheLocation.parse(location)
    store = _clear_for_creation(where)
    n = int(ids.shape[0])
    header = CacheHeader.new(n=n, num_classes=int(num_classes), class_names=list(class_names),
                             rows_per_shard=int(rows_per_shard), dtype=dtype,
                             codecs=codecs_description(), labeled=labels is not None, dataset=dataset,
                             tool_version=__version__, created=now(), command=command)
    group = zarr.create_group(store, zarr_format=3)
    # Every chunk is stored, even one equal to the fill value (an all-class-0 labels shard): a present
    # object per shard is what verify and copy check, and a missing one then always means damage.
    kw = {"chunks": (rows_per_shard,), "compressors": logit_codecs(),
          "config": {"write_empty_chunks": True}}
    group.create_array("ids", data=np.asarray(ids, dtype=np.int64), **kw)
    if labels is not None:
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), **kw)
    _set_header(group, header)
    for m in members:
        add_member_arrays(group, m)
    delete_key(store, CREATING_MARKER)
    return group


def _clear_for_creation(where: CacheLocation) -> Store:
    """Mark ``where`` as being created and remove what an interrupted creation left; its writable store.

    Until the schema is whole the marker stays, so a kill before then leaves a store that is created afresh.
    The writer lock is never removed.
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


def add_member_arrays(group: zarr.Group, identity: Mapping[str, Any]) -> MemberRecord:
    """Append a member to the header and create its (empty) logits and done arrays."""
    h = group_header(group)
    index = len(h.members)
    h = h.with_member({"index": index, "array": member_array(index), **identity, "added": now()})
    # overwrite: arrays at this index that the header does not list are leftovers of an add killed midway.
    group.create_array(member_array(index), shape=(h.n, h.num_classes), dtype=h.dtype,
                       chunks=(h.rows_per_shard, h.num_classes), compressors=logit_codecs(),
                       fill_value=0, overwrite=True)
    # One chunk per flag: writers of different shards never share an object.
    group.create_array(member_done(index), shape=(h.n_shards,), dtype="uint8", chunks=(1,),
                       compressors=[zc.Crc32cCodec()], fill_value=0, overwrite=True)
    _set_header(group, h)
    return h.members[-1]


def mark_complete(location: str | Path | CacheLocation) -> None:
    """Set ``complete`` (after verifying every done flag) and consolidate the metadata, in that order."""
    where = CacheLocation.parse(location)
    store = where.open("w")
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    h = group_header(group, where.display)
    for m in h.members:
        flags = group[member_done(m.index)][:]
        if not flags.all():
            raise CacheError(f"{where}: member {m.index} still misses {int((flags == 0).sum())} shards")
    _set_header(group, h.completed(now()))
    zarr.consolidate_metadata(store)


def array_handle(group: zarr.Group, path: str, handles: dict) -> zarr.Array:
    """``group[path]``, opened once per ``handles`` dict.

    Opening an array reads and parses its metadata; per shard read or write that would dominate small
    shards. A handle is plain metadata (no file handles), so holders stay fork-safe.
    """
    if path not in handles:
        arr = group[path]
        # The write_empty_chunks choice is a runtime setting in zarr 3, not metadata: apply it on every open.
        handles[path] = arr.with_config({"write_empty_chunks": True}) if isinstance(arr, zarr.Array) else arr
    return handles[path]


def write_shard(group: zarr.Group, member: int, shard: int, logits: np.ndarray, ids: np.ndarray,
                handles: dict | None = None, header: CacheHeader | None = None) -> None:
    """Write one whole shard of one member's logits, then its done flag.

    Args:
        logits: (rows, C) float32 raw logits for the shard's rows.
        ids: (rows,) sample ids of those rows, named in errors.
        handles: array handles kept across calls by a writer of many shards (see :func:`array_handle`).
        header: the cache's header, when the caller holds it (else read from ``group``).

    Raises:
        CacheError: NaN/inf logits, or logits beyond float16's range in a float16 cache (nothing is
            written).
    """
    h = header if header is not None else group_header(group)
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise CacheError(
            f"member {member} produced NaN or inf logits for sample ids {_ids_list(ids[bad])}; the teacher "
            "is broken on these inputs, nothing was written for this shard"
        )
    if h.dtype == "float16":
        over = (np.abs(logits) > FLOAT16_MAX).any(axis=1)
        if over.any():
            raise CacheError(
                f"member {member} has logits beyond float16's range (|v| > {FLOAT16_MAX:.0f}, max "
                f"{np.abs(logits).max():.4g}) for sample ids {_ids_list(ids[over])}; they would be stored "
                "as inf. Re-create the cache with --dtype float32"
            )
    start, stop = h.shard_bounds(shard)
    if logits.shape != (stop - start, h.num_classes):
        raise CacheError(f"shard {shard} of member {member}: expected logits of shape "
                         f"{(stop - start, h.num_classes)}, got {logits.shape}")
    handles = {} if handles is None else handles
    array_handle(group, member_array(member), handles)[start:stop] = logits.astype(h.dtype)
    array_handle(group, member_done(member), handles)[shard] = 1


def _ids_list(ids: np.ndarray, limit: int = 20) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return f"[{shown}{', ...' if ids.size > limit else ''}] ({ids.size} in all)"


# ------------------------------------------------------------------------------------------------------ reader
@dataclass
class CacheInfo:
    """What ``cache info`` prints."""

    location: str
    header: CacheHeader
    shards_done: list[int]
    size_on_disk: int
    raw_size: int

    def to_dict(self) -> dict:
        h = self.header
        dataset = h.dataset.to_dict()
        return {
            "location": self.location, "format": h.format, "version": h.version, "n": h.n,
            "num_classes": h.num_classes, "class_names": list(h.class_names), "dtype": h.dtype,
            "codecs": None if h.codecs is None else list(h.codecs), "rows_per_shard": h.rows_per_shard,
            "n_shards": h.n_shards, "shards_done": self.shards_done, "complete": h.complete,
            "labeled": h.labeled,
            "members": [{k: m.to_dict().get(k)
                         for k in ("index", "model_spec", "checkpoint_sha256", "path", "metrics")}
                        for m in h.members],
            "dataset": {k: dataset.get(k) for k in ("spec", "fingerprint", "n", "sample_shape", "labeled")},
            "size_on_disk": self.size_on_disk, "raw_float32_size": self.raw_size,
            "created": h.created, "completed_at": h.completed_at, "command": h.command,
            "tool_version": h.tool_version,
        }


class LogitCache:
    """Read access to a cache. Opening never writes.

    Args:
        location: the cache: a :class:`~pipeline.cache.location.CacheLocation`, or a directory, a
            ``.zarr.zip`` bundle or an ``s3://`` URL (then without storage options: the AWS environment's).
        allow_partial: accept an incomplete cache (only finished shards are then served).

    Raises:
        CacheError: missing, not a cache, bad header, or partial without ``allow_partial``.
    """

    def __init__(self, location: str | Path | CacheLocation, allow_partial: bool = False) -> None:
        self.location = CacheLocation.parse(location)
        if not self.location.exists():
            raise CacheError(f"{self.location}: no such cache; create one with `kd-pipeline cache-logits "
                             f"--out {self.location} ...`")
        self.store = self.location.open("r")  # read-only: reading never writes
        check_metadata_size(self.store, self.location.display)
        try:
            self.group = zarr.open_group(self.store, mode="r", use_consolidated=False)
        except zarr.errors.GroupNotFoundError as e:  # zarr's text names its internals
            raise CacheError(f"{self.location}: not a logit cache (no zarr.json at its root); "
                             "give the directory, NAME.zarr.zip or s3:// URL that "
                             "`kd-pipeline cache-logits --out` wrote") from e
        except Exception as e:  # zarr raises several types for a non-group path
            raise CacheError(f"{self.location}: not a Zarr v3 group ({type(e).__name__}: {e})") from e
        self.header = group_header(self.group, self.location.display)
        if not self.complete and not allow_partial:
            done, total = self.count_done()
            raise CacheError(
                f"{self.location}: the cache is partial ({done}/{total} member-shards written). Finish it "
                "by re-running the same `kd-pipeline cache-logits` command (it resumes), or pass "
                "--allow-partial to use only the finished shards"
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
        """(S,) bool: which shards of ``member`` are written."""
        return self._read(member_done(member), slice(None)).astype(bool)

    def done_shards(self, members: list[int] | None = None) -> np.ndarray:
        """Indices of the shards that every chosen member has finished."""
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
            return array_handle(self.group, path, self.__dict__.setdefault("_arrays", {}))
        except KeyError:
            raise CacheError(f"{self.location}: array {path!r} is missing; the cache is damaged") from None

    def _read(self, path: str, sel: Any) -> np.ndarray:
        arr = self._array(path)
        try:
            return np.asarray(arr[sel])
        except Exception as e:  # checksum mismatch, decompression failure, truncated object
            chunk = _chunk_of(sel, arr.chunks)
            raise CacheError(
                f"{self.location}: cannot read chunk {chunk} of array {path!r} ({type(e).__name__}: {e}); "
                "the cache is corrupted there. Re-create that shard by deleting the cache's member or "
                "re-running `kd-pipeline cache-logits` into a fresh --out, or get a good copy"
            ) from e

    def read_logits(self, shard: int, members: list[int] | None = None) -> np.ndarray:
        """One whole shard of raw logits.

        Returns:
            (M, rows, C) array in the storage dtype (float16 by default), members in the given order.
        """
        chosen = range(len(self.members)) if members is None else members
        start, stop = self.shard_bounds(shard)
        return np.stack([self._read(member_array(m), slice(start, stop)) for m in chosen])

    def read_labels(self, shard: int | None = None) -> np.ndarray | None:
        """(rows,) int64 labels of one shard (all rows when ``shard`` is None), or None if unlabeled."""
        if not self.labeled:
            return None
        return self._read("labels", slice(*self.shard_bounds(shard)) if shard is not None else slice(None))

    def read_ids(self, shard: int | None = None) -> np.ndarray:
        """(rows,) int64 sample ids of one shard (all rows when ``shard`` is None)."""
        return self._read("ids", slice(*self.shard_bounds(shard)) if shard is not None else slice(None))

    def iter_shards(self, members: list[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        for s in self.done_shards(members):
            yield int(s), self.read_logits(int(s), members)

    # -- description
    def info(self) -> CacheInfo:
        done = self.done_shards().tolist()
        size = sum(key_sizes(self.store).values())
        raw = self.n * self.num_classes * 4 * len(self.members)
        return CacheInfo(self.location.display, self.header, done, size, raw)


def _chunk_of(sel: Any, chunks: tuple[int, ...]) -> tuple[int, ...]:
    start = sel.start if isinstance(sel, slice) and sel.start is not None else 0
    return (start // chunks[0],) + (0,) * (len(chunks) - 1)


def check_metadata_size(store: Store, where: str) -> None:
    """Refuse a root ``zarr.json`` over ``MAX_METADATA_BYTES`` before zarr parses it (a cache's is KiB)."""
    try:
        size = sync(store.getsize("zarr.json"))
    except (FileNotFoundError, KeyError):
        return  # nothing to parse; the open that follows says what is missing
    except Exception:  # noqa: BLE001 - a store that cannot tell sizes: zarr's own parsing still validates
        return
    if size > MAX_METADATA_BYTES:
        raise CacheError(f"{where}: zarr.json is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit for "
                         "cache metadata; this is not a kd-pipeline cache (or it was tampered with). "
                         "Refusing to parse it")


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
        if not (p / "zarr.json").is_file():
            raise CacheError(f"{where}: exists but is not a Zarr store; choose another --out or remove it")
        store = where.open("r")
    else:
        if not where.exists():
            return None
        store = where.open("r")
        names = {k for k in list_keys(store) if not k.startswith(CacheLock.NAME)}
        if not names or CREATING_MARKER in names:
            return None
        if "zarr.json" not in names:
            raise CacheError(f"{where}: holds objects but no zarr.json (not a Zarr store, or a copy that "
                             "did not finish: re-run `kd-pipeline cache copy` to complete it); choose "
                             "another --out")
    check_metadata_size(store, where.display)
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    return group_header(group, where.display)


def remove_partial_files(location: str | Path | CacheLocation) -> int:
    """Delete leftovers of writes interrupted by a kill (zarr's ``*.partial`` temp files); returns how many.

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


def cache_fingerprint(header: CacheHeader | Mapping[str, Any], members: list[int] | None = None) -> str:
    """Identity of a cache's content (:meth:`CacheHeader.fingerprint`); a header dict is read first."""
    if not isinstance(header, CacheHeader):
        header = CacheHeader.from_dict(dict(header))
    return header.fingerprint(members)
