"""Where caches live: the one place that turns a cache location into a Zarr store.

A location is one of

- a local directory ``data/caches/NAME.zarr`` (zarr's ``LocalStore``),
- a single-file bundle ``NAME.zarr.zip`` (zarr's ``ZipStore``; read-only except while ``cache pack`` writes it once),
- an object-store URL ``s3://bucket/prefix/NAME.zarr`` (zarr's ``FsspecStore`` over s3fs; other fsspec schemes such
  as ``gs://`` go the same way but are untested). Credentials, region and endpoint come from the standard AWS
  environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
  ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``) that botocore reads; ``storage_options`` (the CLI's
  ``--storage-option key=value``) are passed to the filesystem for the rest.

Read-only opens use read-only stores, so opening a cache for reading can never write to it. A zip is validated
before zarr sees it (no absolute names, no ``..``, no symlinks, sane sizes). Also here: key-level helpers that work
on any of the three (list, sizes, get, put, delete) and the object-store writer lease.

This module imports without torch.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ZipStore

from pipeline.errors import CacheError

ZIP_SUFFIX = ".zip"
MAX_ZIP_ENTRIES = 2_000_000
MAX_ZIP_ENTRY_BYTES = 4 << 30  # a logit chunk is one shard of one member: far below this
MAX_ZIP_TOTAL_BYTES = 1 << 40
MAX_METADATA_BYTES = 16 << 20  # any zarr.json bigger than this is not a cache's: refuse before parsing it

LEASE_NAME = "kd-writer.lock"
LEASE_SECONDS = 120.0  # an object-store lease not renewed for this long is taken over
LEASE_RENEW_SECONDS = 30.0


# ------------------------------------------------------------------------------------------------ locations
def is_url(location: str | Path) -> bool:
    """True for ``scheme://...`` (an fsspec URL; ``file://`` counts as a local path)."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def is_zip(location: str | Path) -> bool:
    return not is_url(location) and str(location).endswith(ZIP_SUFFIX)


def is_local_dir(location: str | Path) -> bool:
    return not is_url(location) and not is_zip(location)


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://"))


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``["endpoint_url=http://...", "anon=true"]`` -> dict; values that parse as JSON (true, 3, null) are decoded.

    A dotted key sets a nested option: ``client_kwargs.region_name=eu-west-1``.

    Raises:
        CacheError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CacheError(f"--storage-option expects KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000), "
                             f"got {item!r}")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = parsed
    return out


def _fsspec_options(storage_options: dict | None) -> dict:
    opts = dict(storage_options or {})
    # s3fs caches listings per filesystem instance; another process (a writer, a copy) may change the store
    # between our listings, so never trust a cached one.
    opts.setdefault("use_listings_cache", False)
    return opts


# ----------------------------------------------------------------------------------------------------- zips
def validate_zip(path: str | Path) -> None:
    """Refuse a zip whose entries could escape or exhaust: absolute names, ``..``, symlinks, huge entries.

    Raises:
        CacheError: what was found and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such cache bundle; make one with `kd-pipeline cache pack CACHE {path}`")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CacheError(f"{path}: not a readable zip file ({e}); expected a bundle made by `kd-pipeline cache "
                         "pack`. Get a good copy") from None
    with zf:
        infos = zf.infolist()
        problems = []
        if len(infos) > MAX_ZIP_ENTRIES:
            problems.append(f"{len(infos)} entries (limit {MAX_ZIP_ENTRIES})")
        names: set[str] = set()
        total = 0
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
                problems.append(f"entry {name!r} has an absolute path")
            elif ".." in parts:
                problems.append(f"entry {name!r} contains '..'")
            if stat.S_ISLNK(info.external_attr >> 16):
                problems.append(f"entry {name!r} is a symlink")
            if info.flag_bits & 0x1:
                problems.append(f"entry {name!r} is encrypted")
            if info.file_size > MAX_ZIP_ENTRY_BYTES:
                problems.append(f"entry {name!r} is {info.file_size} bytes (limit {MAX_ZIP_ENTRY_BYTES})")
            if name in names:
                problems.append(f"entry {name!r} appears twice")
            names.add(name)
            total += info.file_size
        if total > MAX_ZIP_TOTAL_BYTES:
            problems.append(f"{total} bytes uncompressed in all (limit {MAX_ZIP_TOTAL_BYTES})")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} problems in all)" if len(problems) > 10 else "")
        raise CacheError(f"{path}: refusing this bundle: {shown}. A cache bundle holds only relative Zarr keys "
                         "(zarr.json, ids/c/0, members/0/logits/c/0/0, ...). Do not use it; ask its sender for a "
                         "bundle made by `kd-pipeline cache pack`")


# ---------------------------------------------------------------------------------------------------- stores
def open_store(location: str | Path, mode: str = "r", storage_options: dict | None = None) -> Store:
    """The Zarr store for a cache location.

    Args:
        location: a directory, a ``.zarr.zip`` file or an fsspec URL (``s3://bucket/prefix/NAME.zarr``).
        mode: ``"r"`` read-only; ``"w"`` writable (directories and URLs; a zip is written only by
            :func:`create_zip_store`).
        storage_options: passed to fsspec for URLs (endpoint_url, anon, profile, client_kwargs, ...).

    Raises:
        CacheError: a zip opened for writing, or an invalid zip.
    """
    if mode not in ("r", "w"):
        raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
    if is_url(location):
        try:
            store = FsspecStore.from_url(str(location).rstrip("/"), storage_options=_fsspec_options(storage_options),
                                         read_only=mode == "r")
        except ImportError as e:
            raise CacheError(f"{location}: this URL needs an fsspec backend that is not installed ({e}); for s3:// "
                             "install s3fs (`pip install s3fs`)") from None
        return store
    if is_zip(location):
        if mode != "r":
            raise CacheError(f"{location}: a .zarr.zip bundle is read-only; write to a directory or s3:// URL and "
                             f"bundle it with `kd-pipeline cache pack CACHE {location}`")
        validate_zip(local_path(location))
        return ZipStore(local_path(location), mode="r")
    return LocalStore(local_path(location), read_only=mode == "r")


def create_zip_store(path: str | Path) -> ZipStore:
    """A fresh zip written once (``cache pack``); close it when done."""
    return ZipStore(local_path(path), mode="w")


def location_exists(location: str | Path, storage_options: dict | None = None) -> bool:
    """Whether anything is stored at ``location`` (a URL exists when at least one key lies under it)."""
    if not is_url(location):
        return local_path(location).exists()
    return bool(list_keys(open_store(location, "r", storage_options), limit=1))


def list_keys(store: Store, limit: int | None = None) -> list[str]:
    """Every key of a store, sorted (``limit``: stop after that many, unsorted)."""

    async def collect() -> list[str]:
        out = []
        async for k in store.list():
            out.append(k)
            if limit is not None and len(out) >= limit:
                break
        return out

    keys = sync(collect())
    return keys if limit is not None else sorted(keys)


def key_sizes(store: Store) -> dict[str, int]:
    """{key: size in bytes} of every key, with as few requests as the store allows."""
    if isinstance(store, FsspecStore):
        found = sync(store.fs._find(store.path, detail=True, withdirs=False))
        base = store.path.rstrip("/") + "/"
        return {name.removeprefix(base): int(info.get("size") or 0) for name, info in sorted(found.items())}
    if isinstance(store, ZipStore):
        if not store._is_open:
            sync(store._open())
        return {i.filename: i.file_size for i in store._zf.infolist() if not i.is_dir()}
    return {k: int(sync(store.getsize(k))) for k in list_keys(store)}


def get_bytes(store: Store, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def put_bytes(store: Store, key: str, data: bytes) -> None:
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete_key(store: Store, key: str) -> None:
    sync(store.delete(key))


def display(location: str | Path) -> str:
    return str(location)


# ----------------------------------------------------------------------------------------------------- lease
class StoreLease:
    """The writer lock of a cache in an object store: ``<cache>/kd-writer.lock``, a lease with an owner and expiry.

    Taking it is one conditional PUT (``If-None-Match: *``), which S3 (and moto) perform atomically: of two writers
    exactly one creates the object, and the second is refused with a message naming the first. A lease whose
    expiry has passed (its writer died without releasing it) is taken over by a compare-and-swap PUT
    (``If-Match: <its ETag>``), so two writers taking over the same dead lease cannot both win either. The holder
    renews it every ``LEASE_RENEW_SECONDS`` (again compare-and-swap on its own ETag); a renewal that fails means
    the lease was lost (the holder stalled past its expiry and another writer took over), which
    :meth:`check` reports before the cache is marked complete.

    Limits: stores without conditional writes are refused (no silent fallback). A writer frozen longer than
    ``LEASE_SECONDS`` loses its lease and may still write shards before it notices; those shards carry the same
    deterministic bytes the new writer computes, and each shard is one object, so the damage is duplicate work.
    """

    def __init__(self, location: str, storage_options: dict | None = None, seconds: float = LEASE_SECONDS) -> None:
        self.location = str(location).rstrip("/")
        store = open_store(self.location, "w", storage_options)
        assert isinstance(store, FsspecStore)
        self.fs = store.fs
        self.key = f"{store.path.rstrip('/')}/{LEASE_NAME}"
        self.seconds = seconds
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "renewed": now,
                           "expires": now + self.seconds}).encode()

    def _put(self, **cond: str) -> str:
        out = sync(self.fs._pipe_file(self.key, self._body(), **cond))
        return out["ETag"]

    def read(self) -> tuple[dict, str | None]:
        """(the lease's content, its ETag), or ({}, None) when there is none."""
        try:
            info = sync(self.fs._info(self.key))
            body = sync(self.fs._cat_file(self.key))
        except FileNotFoundError:
            return {}, None
        try:
            content = json.loads(body)
        except ValueError:
            content = {}
        return (content if isinstance(content, dict) else {}), info.get("ETag")

    def acquire(self) -> StoreLease:
        for _ in range(3):
            try:
                self.etag = self._put(mode="create")
            except FileExistsError:
                other, etag = self.read()
                if etag is None:
                    continue  # released between our PUT and our read: try again
                if float(other.get("expires", 0)) > time.time():
                    raise CacheError(
                        f"{self.location}: another process is writing this cache (pid {other.get('pid')} on "
                        f"{other.get('host')}, since {other.get('since')}, lease {other.get('owner')} valid until "
                        f"{time.strftime('%H:%M:%S', time.localtime(float(other.get('expires', 0))))}); wait for it "
                        f"to finish, or for its lease to expire if that process is gone"
                    ) from None
                try:  # expired: take it over, atomically against other takers
                    self.etag = self._put(IfMatch=etag)
                except (OSError, FileExistsError):
                    continue  # someone else took it over (or renewed it) first: look again
            except OSError as e:
                raise CacheError(f"{self.location}: could not take the writer lease ({e}); the object store must "
                                 "support conditional writes (If-None-Match), as AWS S3 does") from None
            self._thread = threading.Thread(target=self._renew_loop, name="kd-lease", daemon=True)
            self._thread.start()
            return self
        raise CacheError(f"{self.location}: could not take the writer lease (it changed hands while we tried)")

    def _renew_loop(self) -> None:
        renewed = time.time()
        while not self._stop.wait(min(LEASE_RENEW_SECONDS, self.seconds / 4)):
            try:
                self.etag = self._put(IfMatch=self.etag or "")
                renewed = time.time()
                continue
            except Exception as e:  # noqa: BLE001 - decided below; reported by check()
                error = f"{type(e).__name__}: {e}"
            # A failed renewal is not yet a lost lease: a throttled or dropped request leaves it ours. It is lost
            # when someone else holds it, or when we could not renew it before it expired.
            try:
                other, _ = self.read()
                taken = other.get("owner") != self.owner
            except Exception:  # noqa: BLE001 - the store is unreachable: only expiry decides
                taken = False
            if taken or time.time() > renewed + self.seconds:
                self.lost = error if not taken else f"taken over by lease {other.get('owner')} ({error})"
                return

    def check(self) -> None:
        """Raise if the lease was lost (another writer took it over after this one stalled past expiry)."""
        if self.lost:
            raise CacheError(f"{self.location}: this writer lost its lease ({self.lost}); another process may be "
                             "writing the cache. Re-run the command to resume it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.etag is not None and not self.lost:
            other, etag = self.read()
            if other.get("owner") == self.owner:  # never delete a lease someone else took over
                sync(self.fs._rm_file(self.key))
        self.etag = None
