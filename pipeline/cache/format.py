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

import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc
from zarr.abc.store import Store
from zarr.core.sync import sync

from pipeline import __version__
from pipeline.cache.location import (
    MAX_METADATA_BYTES,
    StoreLease,
    delete_key,
    is_local_dir,
    is_url,
    key_sizes,
    list_keys,
    local_path,
    location_exists,
    open_store,
    put_bytes,
)
from pipeline.errors import CacheError

FORMAT_NAME = "kd-pipeline-logit-cache"
FORMAT_VERSION = 1
ATTR_KEY = "kd_cache"
MAX_HEADER_BYTES = 1 << 20  # a header bigger than this is not ours: refuse before parsing further
FLOAT16_MAX = float(np.finfo(np.float16).max)
ZSTD_LEVEL = 3

CREATING_MARKER = "kd-creating"  # present while a cache is being created: a store with it is unfinished

# Consolidated metadata is a zarr-python extension; we use it deliberately (fewer reads from object stores).
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
# Our writer lock lives in the store while the metadata is consolidated; zarr notes it is not a zarr object.
warnings.filterwarnings("ignore", message="Object at kd-writer.lock")


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


# ------------------------------------------------------------------------------------------------- validation
def validate_header(h: Any, where: str = "cache") -> dict:
    """Check a header against the format schema; return it or raise ``CacheError`` listing what is wrong."""
    if not isinstance(h, dict):
        raise CacheError(f"{where}: no kd-pipeline cache header (attribute {ATTR_KEY!r}); is this a logit cache "
                         "made by `kd-pipeline cache-logits`?")
    if len(json.dumps(h)) > MAX_HEADER_BYTES:
        raise CacheError(f"{where}: the cache header is over {MAX_HEADER_BYTES} bytes; refusing to use it")
    if h.get("format") != FORMAT_NAME:
        raise CacheError(f"{where}: format is {h.get('format')!r}, expected {FORMAT_NAME!r}")
    if not isinstance(h.get("version"), int) or h["version"] > FORMAT_VERSION:
        raise CacheError(f"{where}: cache format version {h.get('version')!r} is not supported by this kd-pipeline "
                         f"(understands <= {FORMAT_VERSION}); upgrade kd-pipeline")
    types = {"n": int, "num_classes": int, "rows_per_shard": int, "n_shards": int, "dtype": str,
             "labeled": bool, "dataset": dict, "members": list, "complete": bool, "class_names": list}
    problems = [f"{k} should be {t.__name__}, found {type(h.get(k)).__name__}"
                for k, t in types.items() if not isinstance(h.get(k), t)]
    if not problems:
        if h["n_shards"] != math.ceil(h["n"] / h["rows_per_shard"]):
            problems.append(f"n_shards={h['n_shards']} does not match n={h['n']} / "
                            f"rows_per_shard={h['rows_per_shard']}")
        if h["dtype"] not in ("float16", "float32"):
            problems.append(f"dtype {h['dtype']!r} is not float16 or float32")
        for i, m in enumerate(h["members"]):
            if not isinstance(m, dict) or m.get("index") != i or not isinstance(m.get("checkpoint_sha256"), str):
                problems.append(f"member {i} entry is malformed")
            elif m.get("num_classes") != h["num_classes"]:
                problems.append(f"member {i} has {m.get('num_classes')} classes, the cache {h['num_classes']}")
        if not isinstance(h["dataset"].get("fingerprint"), str):
            problems.append("dataset.fingerprint is missing")
    if problems:
        raise CacheError(f"{where}: the cache header does not match format {FORMAT_NAME} v{FORMAT_VERSION}: "
                         + "; ".join(problems))
    return h


# ----------------------------------------------------------------------------------------------------- locking
class CacheLock:
    """One writer at a time: ``CACHE/kd-writer.lock`` (created exclusively) names the writing process.

    In a directory: a lock left by a process that died (SIGKILL) on this host is taken over; a live one makes the
    second writer fail with a message naming the first. The lock file appears with its content (written to a temp
    file, then hard-linked into place), so a kill can never leave an empty lock that names no one. In an object
    store (``s3://``) the same key holds a lease taken with a conditional PUT (see :class:`pipeline.stores.StoreLease`).
    """

    NAME = "kd-writer.lock"

    def __init__(self, root: str | Path, storage_options: dict | None = None) -> None:
        self.lease = StoreLease(str(root), storage_options) if is_url(root) else None
        self.path = Path(local_path(root)) / self.NAME if self.lease is None else None
        self.held = False

    def check(self) -> None:
        """Raise ``CacheError`` if an object-store lease was lost while writing (a directory lock cannot be)."""
        if self.lease is not None:
            self.lease.check()

    def acquire(self) -> CacheLock:
        if self.lease is not None:
            self.lease.acquire()
            self.held = True
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.path.with_name(f"{self.NAME}.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            return self._acquire(tmp, me)
        finally:
            tmp.unlink(missing_ok=True)

    def _acquire(self, tmp: Path, me: dict) -> CacheLock:
        for _ in range(2):
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lock exists
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not _pid_alive(int(other.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its writer is gone
                    continue
                raise CacheError(
                    f"{self.path.parent}: another process is writing this cache (pid {other.get('pid')} on "
                    f"{other.get('host')}, since {other.get('since')}); wait for it to finish, or remove "
                    f"{self.path} if that process is gone"
                ) from None
            self.held = True
            return self
        raise CacheError(f"{self.path}: could not take the writer lock")

    def release(self) -> None:
        if self.held:
            if self.lease is not None:
                self.lease.release()
            else:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed child not yet reaped) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------------ create
def create_cache(location: str | Path, *, dataset: dict, ids: np.ndarray, labels: np.ndarray | None,
                 num_classes: int, class_names: list[str], members: list[dict], dtype: str,
                 rows_per_shard: int, command: str, storage_options: dict | None = None) -> zarr.Group:
    """Create the store schema-first: every array at full size, ids/labels written, no logits yet.

    Args:
        location: a directory or an object-store URL (see :mod:`pipeline.stores`).
        dataset: the transfer set's ``Dataset.describe()``.
        ids: (N,) stable sample ids. labels: (N,) or None.
        members: teacher identities (``LoadedModel.identity()``), one per member.
        storage_options: fsspec options for a URL.
    """
    n = int(ids.shape[0])
    if is_local_dir(location):
        root = local_path(location)
        root.mkdir(parents=True, exist_ok=True)
        marker = root / CREATING_MARKER
        marker.touch()  # until the schema is whole: a kill before then leaves a store that is created afresh
        for child in root.iterdir():  # leftovers of an interrupted creation (never the writer lock)
            if child.name != CREATING_MARKER and not child.name.startswith(CacheLock.NAME):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        store = open_store(location, "w")
    else:
        store = open_store(location, "w", storage_options)
        put_bytes(store, CREATING_MARKER, b"")  # the same protocol, as an object
        for key in list_keys(store):
            if key != CREATING_MARKER and not key.startswith(CacheLock.NAME):
                delete_key(store, key)
    header = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "n": n, "num_classes": int(num_classes), "class_names": list(class_names),
        "rows_per_shard": int(rows_per_shard), "n_shards": math.ceil(n / rows_per_shard),
        "dtype": dtype, "codecs": codecs_description(), "labeled": labels is not None,
        "dataset": dataset, "members": [],
        "tool": "kd-pipeline", "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
        "complete": False, "completed_at": None,
    }
    group = zarr.create_group(store, zarr_format=3)
    # Every chunk is stored, even one equal to the fill value (an all-class-0 labels shard): a present object per
    # shard is what verify and copy check, and a missing one then always means damage.
    kw = {"chunks": (rows_per_shard,), "compressors": logit_codecs(), "config": {"write_empty_chunks": True}}
    group.create_array("ids", data=np.asarray(ids, dtype=np.int64), **kw)
    if labels is not None:
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), **kw)
    group.attrs[ATTR_KEY] = header
    for m in members:
        add_member_arrays(group, m)
    delete_key(store, CREATING_MARKER)
    return group


def add_member_arrays(group: zarr.Group, identity: dict) -> dict:
    """Append a member to the header and create its (empty) logits and done arrays."""
    h = dict(group.attrs[ATTR_KEY])
    index = len(h["members"])
    entry = {"index": index, "array": member_array(index), **identity,
             "added": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # overwrite: arrays at this index that the header does not list are leftovers of an add killed midway.
    group.create_array(member_array(index), shape=(h["n"], h["num_classes"]), dtype=h["dtype"],
                       chunks=(h["rows_per_shard"], h["num_classes"]), compressors=logit_codecs(), fill_value=0,
                       overwrite=True)
    # One chunk per flag: writers of different shards never share an object.
    group.create_array(member_done(index), shape=(h["n_shards"],), dtype="uint8", chunks=(1,),
                       compressors=[zc.Crc32cCodec()], fill_value=0, overwrite=True)
    h["members"] = [*h["members"], entry]
    h["complete"] = False
    h["completed_at"] = None
    group.attrs[ATTR_KEY] = h
    return entry


def mark_complete(location: str | Path, storage_options: dict | None = None) -> None:
    """Set ``complete`` (after verifying every done flag) and consolidate the metadata, in that order."""
    store = open_store(location, "w", storage_options)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    h = dict(group.attrs[ATTR_KEY])
    for m in h["members"]:
        flags = group[member_done(m["index"])][:]
        if not flags.all():
            raise CacheError(f"{location}: member {m['index']} still misses {int((flags == 0).sum())} shards")
    h["complete"] = True
    h["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    group.attrs[ATTR_KEY] = h
    zarr.consolidate_metadata(store)


def array_handle(group: zarr.Group, path: str, handles: dict) -> zarr.Array:
    """``group[path]``, opened once per ``handles`` dict.

    Opening an array reads and parses its metadata; per shard read or write that would dominate small shards. A
    handle is plain metadata (no file handles), so holders stay fork-safe.
    """
    if path not in handles:
        arr = group[path]
        # The write_empty_chunks choice is a runtime setting in zarr 3, not metadata: apply it on every open.
        handles[path] = arr.with_config({"write_empty_chunks": True}) if isinstance(arr, zarr.Array) else arr
    return handles[path]


def write_shard(group: zarr.Group, member: int, shard: int, logits: np.ndarray, ids: np.ndarray,
                handles: dict | None = None) -> None:
    """Write one whole shard of one member's logits, then its done flag.

    Args:
        logits: (rows, C) float32 raw logits for the shard's rows.
        ids: (rows,) sample ids of those rows, named in errors.
        handles: array handles kept across calls by a writer of many shards (see :func:`array_handle`).

    Raises:
        CacheError: NaN/inf logits, or logits beyond float16's range in a float16 cache (nothing is written).
    """
    h = group.attrs[ATTR_KEY]
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise CacheError(
            f"member {member} produced NaN or inf logits for sample ids {_ids_list(ids[bad])}; the teacher is "
            "broken on these inputs, nothing was written for this shard"
        )
    if h["dtype"] == "float16":
        over = (np.abs(logits) > FLOAT16_MAX).any(axis=1)
        if over.any():
            raise CacheError(
                f"member {member} has logits beyond float16's range (|v| > {FLOAT16_MAX:.0f}, max "
                f"{np.abs(logits).max():.4g}) for sample ids {_ids_list(ids[over])}; they would be stored as inf. "
                "Re-create the cache with --dtype float32"
            )
    start, stop = shard_bounds(shard, h["rows_per_shard"], h["n"])
    if logits.shape != (stop - start, h["num_classes"]):
        raise CacheError(f"shard {shard} of member {member}: expected logits of shape "
                         f"{(stop - start, h['num_classes'])}, got {logits.shape}")
    handles = {} if handles is None else handles
    array_handle(group, member_array(member), handles)[start:stop] = logits.astype(h["dtype"])
    array_handle(group, member_done(member), handles)[shard] = 1


def _ids_list(ids: np.ndarray, limit: int = 20) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return f"[{shown}{', ...' if ids.size > limit else ''}] ({ids.size} in all)"


# ------------------------------------------------------------------------------------------------------ reader
@dataclass
class CacheInfo:
    """What ``cache info`` prints."""

    location: str
    header: dict
    shards_done: list[int]
    size_on_disk: int
    raw_size: int

    def to_dict(self) -> dict:
        h = self.header
        return {
            "location": self.location, "format": h["format"], "version": h["version"], "n": h["n"],
            "num_classes": h["num_classes"], "class_names": h["class_names"], "dtype": h["dtype"],
            "codecs": h["codecs"], "rows_per_shard": h["rows_per_shard"], "n_shards": h["n_shards"],
            "shards_done": self.shards_done, "complete": h["complete"], "labeled": h["labeled"],
            "members": [{k: m.get(k) for k in ("index", "model_spec", "checkpoint_sha256", "path", "metrics")}
                        for m in h["members"]],
            "dataset": {k: h["dataset"].get(k) for k in ("spec", "fingerprint", "n", "sample_shape", "labeled")},
            "size_on_disk": self.size_on_disk, "raw_float32_size": self.raw_size,
            "created": h["created"], "completed_at": h["completed_at"], "command": h["command"],
            "tool_version": h["tool_version"],
        }


class LogitCache:
    """Read access to a cache. Opening never writes.

    Args:
        location: the cache: a directory, a ``.zarr.zip`` bundle or an ``s3://`` URL (see :mod:`pipeline.stores`).
        allow_partial: accept an incomplete cache (only finished shards are then served).
        storage_options: fsspec options for a URL (endpoint_url, profile, ...).

    Raises:
        CacheError: missing, not a cache, bad header, or partial without ``allow_partial``.
    """

    def __init__(self, location: str | Path, allow_partial: bool = False,
                 storage_options: dict | None = None) -> None:
        self.location = str(location)
        self.storage_options = dict(storage_options or {})
        if not location_exists(self.location, storage_options):
            raise CacheError(f"{self.location}: no such cache; create one with `kd-pipeline cache-logits --out "
                             f"{self.location} ...`")
        self.store = open_store(self.location, "r", storage_options)  # read-only: reading never writes
        check_metadata_size(self.store, self.location)
        try:
            self.group = zarr.open_group(self.store, mode="r", use_consolidated=False)
        except Exception as e:  # zarr raises several types for a non-group path
            raise CacheError(f"{self.location}: not a Zarr v3 group ({type(e).__name__}: {e})") from e
        self.header = validate_header(self.group.attrs.get(ATTR_KEY), self.location)
        if not self.complete and not allow_partial:
            done, total = self.count_done()
            raise CacheError(
                f"{self.location}: the cache is partial ({done}/{total} member-shards written). Finish it by "
                "re-running the same `kd-pipeline cache-logits` command (it resumes), or pass --allow-partial "
                "to use only the finished shards"
            )

    # -- header fields
    @property
    def complete(self) -> bool:
        return bool(self.header["complete"])

    @property
    def n(self) -> int:
        return int(self.header["n"])

    @property
    def num_classes(self) -> int:
        return int(self.header["num_classes"])

    @property
    def n_shards(self) -> int:
        return int(self.header["n_shards"])

    @property
    def rows_per_shard(self) -> int:
        return int(self.header["rows_per_shard"])

    @property
    def members(self) -> list[dict]:
        return list(self.header["members"])

    @property
    def labeled(self) -> bool:
        return bool(self.header["labeled"])

    @property
    def dataset(self) -> dict:
        return dict(self.header["dataset"])

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        return shard_bounds(shard, self.rows_per_shard, self.n)

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
        done = sum(int(self.done_flags(m["index"]).sum()) for m in self.members)
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
                f"{self.location}: cannot read chunk {chunk} of array {path!r} ({type(e).__name__}: {e}); the cache "
                "is corrupted there. Re-create that shard by deleting the cache's member or re-running "
                "`kd-pipeline cache-logits` into a fresh --out, or get a good copy"
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
        return CacheInfo(self.location, self.header, done, size, raw)


def _chunk_of(sel: Any, chunks: tuple[int, ...]) -> tuple[int, ...]:
    start = sel.start if isinstance(sel, slice) and sel.start is not None else 0
    return (start // chunks[0],) + (0,) * (len(chunks) - 1)


def check_metadata_size(store: Store, where: str) -> None:
    """Refuse a root ``zarr.json`` over ``MAX_METADATA_BYTES`` before zarr parses it (a cache's is kilobytes)."""
    try:
        size = sync(store.getsize("zarr.json"))
    except (FileNotFoundError, KeyError):
        return  # nothing to parse; the open that follows says what is missing
    except Exception:  # noqa: BLE001 - a store that cannot tell sizes: zarr's own parsing still validates
        return
    if size > MAX_METADATA_BYTES:
        raise CacheError(f"{where}: zarr.json is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit for cache "
                         "metadata; this is not a kd-pipeline cache (or it was tampered with). Refusing to parse it")


def read_header(location: str | Path, storage_options: dict | None = None) -> dict | None:
    """The header of an existing cache at ``location`` (validated), or None if nothing is there."""
    if is_local_dir(location):
        p = local_path(location)
        if not p.exists():
            return None
        if p.is_dir():
            names = {c.name for c in p.iterdir() if not c.name.startswith(CacheLock.NAME)}
            if not names or CREATING_MARKER in names:
                return None  # empty, or a creation that was interrupted: (re-)created by the writer
        if not (p / "zarr.json").is_file():
            raise CacheError(f"{location}: exists but is not a Zarr store; choose another --out or remove it")
        store = open_store(location, "r")
    else:
        if not location_exists(location, storage_options):
            return None
        store = open_store(location, "r", storage_options)
        names = {k for k in list_keys(store) if not k.startswith(CacheLock.NAME)}
        if not names or CREATING_MARKER in names:
            return None
        if "zarr.json" not in names:
            raise CacheError(f"{location}: holds objects but no zarr.json (not a Zarr store, or a copy that did not "
                             "finish: re-run `kd-pipeline cache copy` to complete it); choose another --out")
    check_metadata_size(store, str(location))
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    return validate_header(group.attrs.get(ATTR_KEY), str(location))


def remove_partial_files(location: str | Path) -> int:
    """Delete leftovers of writes interrupted by a kill (zarr's ``*.partial`` temp files); returns how many.

    Only local directories have them: an object store's PUT is atomic.
    """
    if not is_local_dir(location):
        return 0
    count = 0
    for f in local_path(location).rglob("*.partial"):
        f.unlink(missing_ok=True)
        count += 1
    return count


def cache_fingerprint(header: dict, members: list[int] | None = None) -> str:
    """Identity of a cache's content: dataset fingerprint, member checkpoints (in order), dtype and shape.

    Two caches with the same fingerprint serve the same soft targets; runs record it. With ``members`` the
    fingerprint covers just that subset (what a run actually used).
    """
    import hashlib

    chosen = header["members"] if members is None else [header["members"][i] for i in members]
    ident = {"dataset": header["dataset"]["fingerprint"], "members": [m["checkpoint_sha256"] for m in chosen],
             "dtype": header["dtype"], "n": header["n"], "num_classes": header["num_classes"]}
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
