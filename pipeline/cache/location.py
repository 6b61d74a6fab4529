"""Where caches live: a cache location resolved once into a value, the one place that opens stores.

A location is one of

- a local directory ``data/caches/NAME.zarr`` (zarr's ``LocalStore``),
- a single-file bundle ``NAME.zarr.zip`` (zarr's ``ZipStore``; read-only except while ``cache pack``
  writes it once),
- an object-store URL ``s3://bucket/prefix/NAME.zarr`` (zarr's ``FsspecStore`` over s3fs; other
  fsspec schemes such as ``gs://`` go the same way but are untested). Credentials, region and
  endpoint come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``,
  ``AWS_PROFILE``) that botocore reads; storage options (the CLI's ``--storage-option key=value``)
  are passed to the filesystem for the rest.

:class:`CacheLocation` is that choice made once at the edge (like zarr's ``StorePath`` /
``make_store_path``): the normalised text, its kind (``"dir"``, ``"zip"`` or ``"url"``) and its
storage options, with what callers need: :meth:`~CacheLocation.open` (read-only or writable store,
each opened once per value), :meth:`~CacheLocation.exists`, :meth:`~CacheLocation.lock` (a
directory's lock file or an object store's lease), :attr:`~CacheLocation.name` and
:attr:`~CacheLocation.display`. Library functions take one and accept a plain ``str`` / ``Path`` for
convenience (``CacheLocation.parse`` at their entry).

Read-only opens use read-only stores, so opening a cache for reading can never write to it. A zip is
validated before zarr sees it (no absolute names, no ``..``, no symlinks, sane sizes). Also here:
key-level helpers that work on any of the three stores (list, sizes, get, put, delete) and the
writer lock (:class:`CacheLock`, with :class:`StoreLease` for object stores).

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ZipStore

# MAX_METADATA_BYTES lives with the other read limits in guard.py; lookup and verify import it here.
from pipeline.cache.guard import MAX_METADATA_BYTES as MAX_METADATA_BYTES
from pipeline.cache.guard import GuardedStore, check_bundle
from pipeline.errors import CacheError, StorageError, explain, storage_errors
from pipeline.files import location_stem
from pipeline.redact import is_secret, register_secrets, secret_values
from pipeline.redact import redact_options as redact_options

ZIP_SUFFIX = ".zip"
MAX_ZIP_ENTRIES = 2_000_000
MAX_ZIP_ENTRY_BYTES = 4 << 30  # a logit chunk is one shard of one member: far below this
MAX_ZIP_TOTAL_BYTES = 1 << 40

LEASE_NAME = "kd-writer.lock"
LEASE_SECONDS = 120.0  # an object-store lease not renewed for this long is taken over
LEASE_RENEW_SECONDS = 30.0
# Present from a `cache copy`'s first write until its destination verified: a store holding it is
# an unfinished copy, refused by every reader (its JSON names the source and the source's identity).
COPY_MARKER = "kd-copy-incomplete"

Kind = Literal["dir", "zip", "url"]


# ------------------------------------------------------------------------------------ location text
def is_url(location: str | Path) -> bool:
    """True for ``scheme://...`` (an fsspec URL; ``file://`` counts as a local path)."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def is_zip(location: str | Path) -> bool:
    """True for a local ``*.zip`` path (a cache bundle)."""
    return not is_url(location) and str(location).endswith(ZIP_SUFFIX)


def local_path(location: str | Path) -> Path:
    """The local path of a non-URL location (``file://`` removed)."""
    return Path(str(location).removeprefix("file://"))


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``["endpoint_url=http://...", "anon=true"]`` -> dict; values that parse as JSON are decoded.

    A dotted key sets a nested option: ``client_kwargs.region_name=eu-west-1``.

    Raises:
        CacheError: an item without ``=``; a key given twice with different values, or both as
            an option and as the parent of a dotted one; options that contradict each other.
    """
    out: dict[str, Any] = {}
    given: dict[str, Any] = {}  # key as typed -> its value: the same key twice must agree
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CacheError(
                f"--storage-option expects KEY=VALUE (e.g. "
                f"endpoint_url=http://127.0.0.1:9000), got {item!r}"
            )
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        if key in given and given[key] != parsed:
            raise CacheError(
                f"--storage-option {key} is given twice, as {_shown(key, given[key])} and "
                f"{_shown(key, parsed)}; give it once, with the value you mean"
            )
        given[key] = parsed
        *parents, leaf = key.split(".")
        d = out
        for i, p in enumerate(parents):
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                parent = ".".join(parents[: i + 1])
                raise CacheError(
                    f"--storage-option {key} sets an option inside {parent}, which is also given "
                    f"a value ({parent}={_shown(parent, d)}); give {parent} either a value or "
                    "dotted options"
                )
        if isinstance(d.get(leaf), dict) and not isinstance(parsed, dict):
            raise CacheError(
                f"--storage-option {key}={_shown(key, parsed)} replaces the dotted options "
                f"{key}.* given before it; give {key} either a value or dotted options"
            )
        d[leaf] = parsed
    _refuse_contradictions(out)
    # Credentials given here are masked wherever this process prints or records them.
    register_secrets(secret_values(out))
    return out


def _shown(key: str, value: Any) -> str:
    """A value for a message: a credential's never (the message may be logged or shared)."""
    return "***" if is_secret(key) else repr(value)


def _refuse_contradictions(options: Mapping[str, Any]) -> None:
    """Options that cannot all hold: anonymous access with credentials, two endpoints.

    Raises:
        CacheError: naming the contradicting options and what to do.
    """
    if options.get("anon") is True:
        creds = sorted(k for k in ("key", "secret", "token", "profile") if k in options)
        if creds:
            raise CacheError(
                "--storage-option anon=true (no credentials) contradicts "
                + ", ".join(creds)
                + "; drop anon=true to sign requests, or the credentials to read anonymously"
            )
    client = options.get("client_kwargs")
    inner = client.get("endpoint_url") if isinstance(client, Mapping) else None
    outer = options.get("endpoint_url")
    if inner is not None and outer is not None and inner != outer:
        raise CacheError(
            f"--storage-option endpoint_url={outer} contradicts client_kwargs.endpoint_url="
            f"{inner}; give one endpoint (endpoint_url=URL)"
        )


def _fsspec_options(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(storage_options)
    # s3fs caches listings per filesystem instance; another process (a writer, a copy) may change
    # the store between our listings, so never trust a cached one.
    opts.setdefault("use_listings_cache", False)
    return opts


# --------------------------------------------------------------------------------------------- zips
def validate_zip(path: str | Path) -> None:
    """Refuse a zip whose entries could escape or exhaust: absolute names, ``..``, symlinks, sizes.

    Raises:
        CacheError: what was found and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(
            f"{path}: no such cache bundle; make one with `kd-pipeline cache pack CACHE {path}`"
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CacheError(
            f"{path}: not a readable zip file ({e}); expected a bundle made by "
            "`kd-pipeline cache pack`. Get a good copy"
        ) from None
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
                problems.append(
                    f"entry {name!r} is {info.file_size} bytes (limit {MAX_ZIP_ENTRY_BYTES})"
                )
            if name in names:
                problems.append(f"entry {name!r} appears twice")
            names.add(name)
            total += info.file_size
        if total > MAX_ZIP_TOTAL_BYTES:
            problems.append(f"{total} bytes uncompressed in all (limit {MAX_ZIP_TOTAL_BYTES})")
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; ... ({len(problems)} problems in all)" if len(problems) > 10 else ""
        )
        raise CacheError(
            f"{path}: refusing this bundle: {shown}. A cache bundle holds only "
            "relative Zarr keys (zarr.json, ids/c/0, members/0/logits/c/0/0, ...). Do "
            "not use it; ask its sender for a bundle made by `kd-pipeline cache pack`"
        )


def refuse_cache_output(path: str | Path, flag: str = "--out") -> None:
    """Refuse an output location that is (or is becoming) a cache: writing a run, a report or a
    teacher into it would mix files into the cache (``cache verify`` then fails it) or replace it.

    Raises:
        CacheError: ``path`` is a ``.zarr.zip`` bundle, or a directory holding a cache's root
            ``zarr.json``, a creation marker or an unfinished copy's marker.
    """
    if is_url(path):
        return  # runs are written to local directories; a URL output is refused where parsed
    p = local_path(path)
    is_cache = (p.is_file() and is_zip(p)) or (
        p.is_dir() and any((p / n).exists() for n in ("zarr.json", COPY_MARKER, "kd-creating"))
    )
    if is_cache:
        raise CacheError(
            f"{flag} {path} is a logit cache; an output written into it would damage it. "
            f"Choose another {flag} (e.g. data/runs/NAME)"
        )


# ----------------------------------------------------------------------------------------- location
@dataclass(frozen=True, repr=False)
class CacheLocation:
    """Where one cache lives, resolved once: normalised text, kind and storage options.

    Build it with :meth:`parse` (the CLI's and configs' edge: ``CacheConfig.location``,
    ``StudentConfig.cache_location``, ...) and pass it everywhere instead of a location string and
    its storage options. It is hashable and picklable (dask tasks carry it to workers); the stores
    it opened stay behind (a worker opens its own). Storage options are never printed: ``repr``
    redacts credential-like keys and ``str`` is :attr:`display`.

    Attributes:
        text: the location, normalised: trailing ``/`` removed; a local path as given otherwise.
        kind: ``"dir"`` (a local directory), ``"zip"`` (a ``.zarr.zip`` bundle) or ``"url"`` (fsspec
            URL).
        options_json: the storage options as canonical JSON (``"{}"`` for local locations, which
            take none).
    """

    text: str
    kind: Kind
    options_json: str = "{}"
    _stores: dict[str, Store] = field(default_factory=dict, init=False, compare=False, hash=False)

    @classmethod
    def parse(
        cls, location: str | Path | CacheLocation, storage_options: Mapping[str, Any] | None = None
    ) -> CacheLocation:
        """Resolve ``location`` (and, for a URL, its storage options) into a value; validated once.

        A value given as ``location`` is returned as it is. Storage options only apply to URLs: with
        a local directory or bundle they are ignored (``cache copy`` passes one option list for both
        sides).

        Raises:
            CacheError: an empty location, or storage options that are not plain JSON values.
            TypeError: a ``CacheLocation`` together with storage options (it already has its own).
        """
        if isinstance(location, CacheLocation):
            if storage_options:
                raise TypeError(
                    "a CacheLocation carries its own storage options; parse its text to give others"
                )
            return location
        text = str(location)
        if not text.strip():
            raise CacheError(
                "no cache location given; expected a directory NAME.zarr, a bundle "
                "NAME.zarr.zip or an s3://bucket/prefix/NAME.zarr URL"
            )
        text = text.rstrip("/") or text
        kind: Kind = "url" if is_url(text) else "zip" if is_zip(text) else "dir"
        options = dict(storage_options or {}) if kind == "url" else {}
        try:
            options_json = json.dumps(options, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise CacheError(
                f"{text}: storage options must be plain JSON values (strings, "
                f"numbers, booleans, null, lists, objects): {e}"
            ) from None
        return cls(text, kind, options_json)

    # -- what it is
    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options of a URL (a fresh dict; empty for local locations)."""
        return json.loads(self.options_json)

    @property
    def display(self) -> str:
        """What messages print: the location text, never its storage options."""
        return self.text

    @property
    def name(self) -> str:
        """The cache's name: its last path part without ``.zarr.zip`` / ``.zip`` / ``.zarr``.

        The one slug rule for caches (run-directory names such as ``data/runs/<cache>-...``).
        """
        return location_stem(self.text)

    @property
    def local_path(self) -> Path | None:
        """The local path of a directory or bundle; None for a URL."""
        return None if self.kind == "url" else local_path(self.text)

    def child(self, relative: str) -> CacheLocation:
        """The location ``relative`` below this one (same kind of store, same storage options)."""
        relative = relative.strip("/")
        if self.kind == "url":
            return CacheLocation.parse(f"{self.text}/{relative}", self.storage_options)
        return CacheLocation.parse(str(local_path(self.text) / relative))

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        opts = redact_options(self.storage_options)
        return (
            f"CacheLocation({self.text!r}, kind={self.kind!r}"
            + (f", storage_options={opts}" if opts else "")
            + ")"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"text": self.text, "kind": self.kind, "options_json": self.options_json}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_stores", {})

    # -- stores
    def open(self, mode: Literal["r", "w"] = "r") -> Store:
        """The Zarr store: ``"r"`` read-only, ``"w"`` writable (directories and URLs only).

        Each mode's store is opened once per value and reused: a command holding one location opens
        it once. (Directory and object stores keep no data or listings of their own, so a reused
        read-only store sees later writes; a bundle is written once.)

        Raises:
            CacheError: a bundle opened for writing, an invalid bundle, or a URL scheme whose fsspec
                backend is not installed.
        """
        if mode not in ("r", "w"):
            raise ValueError(f"mode must be 'r' or 'w', got {mode!r}")
        store = self._stores.get(mode)
        if store is None:
            # No lock: two threads opening at once build two stores and keep the first (setdefault
            # is atomic); a lock would serialise every thread's first open of every location.
            store = self._stores.setdefault(mode, self._new_store(mode))
        return store

    def _new_store(self, mode: str) -> Store:
        store = self._raw_store(mode)
        # Reading someone else's cache: every key is checked against its header before zarr
        # parses or decompresses it (see pipeline.cache.guard).
        return GuardedStore(store, self.display) if mode == "r" else store

    def _raw_store(self, mode: str) -> Store:
        if self.kind == "url":
            try:
                return FsspecStore.from_url(
                    self.text,
                    read_only=mode == "r",
                    storage_options=_fsspec_options(self.storage_options),
                )
            except ImportError as e:
                raise CacheError(
                    f"{self.text}: this URL needs an fsspec backend that is not "
                    f"installed ({e}); for s3:// install the s3 extra: "
                    "pip install 'kd-pipeline[s3]'"
                ) from None
        if self.kind == "zip":
            if mode != "r":
                raise CacheError(
                    f"{self.text}: a .zarr.zip bundle is read-only; write to a "
                    "directory or s3:// URL and bundle it with `kd-pipeline cache "
                    f"pack CACHE {self.text}`"
                )
            validate_zip(local_path(self.text))
            store = ZipStore(local_path(self.text), mode="r")
            check_bundle(store, self.display)  # entry sizes against the header, before zarr reads
            return store
        return LocalStore(local_path(self.text), read_only=mode == "r")

    def create_zip(self) -> ZipStore:
        """A fresh bundle at this (zip) location, written once by ``cache pack``; close it after."""
        if self.kind != "zip":
            raise CacheError(f"{self.text}: not a .zarr.zip bundle location")
        return ZipStore(local_path(self.text), mode="w")

    def exists(self) -> bool:
        """Whether anything is stored here (a URL exists when at least one key lies under it)."""
        if self.kind != "url":
            return local_path(self.text).exists()
        return bool(list_keys(self.open("r"), limit=1))

    def lock(self) -> CacheLock:
        """The writer lock of this cache, not yet taken (a context manager, or ``acquire()``)."""
        return CacheLock(self)


def open_store(
    location: str | Path | CacheLocation,
    mode: Literal["r", "w"] = "r",
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """``CacheLocation.parse(location, storage_options).open(mode)``: for one-off uses (tests)."""
    return CacheLocation.parse(location, storage_options).open(mode)


# --------------------------------------------------------------------------------------- store keys
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
    if isinstance(store, GuardedStore):
        with storage_errors(store.where, keep=(FileNotFoundError,)):
            return key_sizes(store.inner)
    if isinstance(store, FsspecStore):
        found = sync(store.fs._find(store.path, detail=True, withdirs=False))
        base = store.path.rstrip("/") + "/"
        return {
            name.removeprefix(base): int(info.get("size") or 0)
            for name, info in sorted(found.items())
        }
    if isinstance(store, ZipStore):
        if not store._is_open:
            sync(store._open())
        return {i.filename: i.file_size for i in store._zf.infolist() if not i.is_dir()}
    return {k: int(sync(store.getsize(k))) for k in list_keys(store)}


def get_bytes(store: Store, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def refuse_unfinished_copy(store: Store, where: str) -> None:
    """Refuse a store that an unfinished ``cache copy`` left (its :data:`COPY_MARKER` is there).

    Raises:
        CacheError: naming the copy's source and what to do.
    """
    raw = get_bytes(store, COPY_MARKER)
    if raw is None:
        return
    try:
        source = json.loads(raw).get("source", "?")
    except (ValueError, AttributeError):
        source = "?"
    raise CacheError(
        f"{where}: INCOMPLETE: an unfinished copy of {source} (a `kd-pipeline cache copy` into it "
        "was interrupted, failed or did not verify); complete it by re-running `kd-pipeline "
        f"cache copy {source} {where}`, or remove it"
    )


def put_bytes(store: Store, key: str, data: bytes) -> None:
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete_key(store: Store, key: str) -> None:
    sync(store.delete(key))


# -------------------------------------------------------------------------------------------- lease
def _clock(epoch: object) -> str:
    """``HH:MM:SS`` local time of a POSIX timestamp (a lease's expiry)."""
    return time.strftime("%H:%M:%S", time.localtime(float(epoch)))  # type: ignore[arg-type]


class StoreLease:
    """An object-store cache's writer lock: ``<cache>/kd-writer.lock``, a lease (owner, expiry).

    Taking it is one conditional PUT (``If-None-Match: *``), which S3 (and moto) perform atomically:
    of two writers exactly one creates the object, and the second is refused with a message naming
    the first. A lease whose expiry has passed (its writer died without releasing it) is taken over
    by a compare-and-swap PUT (``If-Match: <its ETag>``), so two writers taking over the same dead
    lease cannot both win either. The holder renews it every ``LEASE_RENEW_SECONDS`` (again
    compare-and-swap on its own ETag); a renewal that fails means the lease was lost (the holder
    stalled past its expiry and another writer took over), which :meth:`check` reports before the
    cache is marked complete.

    Limits: stores without conditional writes are refused (no silent fallback). A writer frozen
    longer than ``LEASE_SECONDS`` loses its lease and may still write shards before it notices;
    those shards carry the same deterministic bytes the new writer computes, and each shard is one
    object, so the damage is duplicate work.
    """

    def __init__(self, location: str | CacheLocation, seconds: float = LEASE_SECONDS) -> None:
        where = CacheLocation.parse(location)
        self.location = where.display
        store = where.open("w")
        if not isinstance(store, FsspecStore):
            raise CacheError(f"{where}: an object-store lease needs an object-store URL (s3://...)")
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
        return json.dumps(
            {
                "owner": self.owner,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "renewed": now,
                "expires": now + self.seconds,
            }
        ).encode()

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
                        f"{self.location}: another process is writing this cache (pid "
                        f"{other.get('pid')} on {other.get('host')}, since {other.get('since')}, "
                        f"lease {other.get('owner')} valid until "
                        f"{_clock(other.get('expires', 0))}); wait for it to finish, or for its "
                        "lease to expire if that process is gone"
                    ) from None
                try:  # expired: take it over, atomically against other takers
                    self.etag = self._put(IfMatch=etag)
                except (OSError, FileExistsError):
                    continue  # someone else took it over (or renewed it) first: look again
            except OSError as e:
                # A missing bucket or refused credentials fail this first write too: say that, not
                # that conditional writes are missing.
                reason = explain(e, self.location)
                if isinstance(reason, StorageError) and not _conditional_write_refused(e):
                    raise reason from e
                raise CacheError(
                    f"{self.location}: could not take the writer lease ({e}); the "
                    "object store must support conditional writes (If-None-Match), as "
                    "AWS S3 does"
                ) from None
            self._thread = threading.Thread(target=self._renew_loop, name="kd-lease", daemon=True)
            self._thread.start()
            return self
        raise CacheError(
            f"{self.location}: could not take the writer lease (it changed hands while we tried)"
        )

    def _renew_loop(self) -> None:
        renewed = time.time()
        while not self._stop.wait(min(LEASE_RENEW_SECONDS, self.seconds / 4)):
            try:
                self.etag = self._put(IfMatch=self.etag or "")
                renewed = time.time()
                continue
            except Exception as e:  # noqa: BLE001 - decided below; reported by check()
                error = f"{type(e).__name__}: {e}"
            # A failed renewal is not yet a lost lease: a throttled or dropped request leaves it
            # ours. It is lost when someone else holds it, or when we could not renew it before it
            # expired.
            try:
                other, _ = self.read()
                taken = other.get("owner") != self.owner
            except Exception:  # noqa: BLE001 - the store is unreachable: only expiry decides
                taken = False
            if taken or time.time() > renewed + self.seconds:
                self.lost = (
                    error if not taken else f"taken over by lease {other.get('owner')} ({error})"
                )
                return

    def check(self) -> None:
        """Raise if the lease was lost (taken over by another writer after this one stalled)."""
        if self.lost:
            raise CacheError(
                f"{self.location}: this writer lost its lease ({self.lost}); another "
                "process may be writing the cache. Re-run the command to resume it"
            )

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


def _conditional_write_refused(e: BaseException) -> bool:
    """Whether the store rejected the conditional PUT itself (501 NotImplemented, or a 400 naming
    the If-None-Match header), rather than failing for a reason any write would."""
    for cause in (e, e.__cause__, e.__context__):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            text = str(response.get("Error", {}).get("Message", ""))
            return code in ("NotImplemented", "501") or "If-None-Match" in text
    return "If-None-Match" in str(e) or "NotImplemented" in str(e)


# --------------------------------------------------------------------------------------------- lock
class CacheLock:
    """One writer at a time: ``CACHE/kd-writer.lock`` (created exclusively) names the writer.

    In a directory: a lock left by a process that died (SIGKILL) on this host is taken over; a live
    one makes the second writer fail with a message naming the first. The lock file appears with its
    content (written to a temp file, then hard-linked into place), so a kill can never leave an
    empty lock that names no one. In an object store (``s3://``) the same key holds a lease taken
    with a conditional PUT (see :class:`StoreLease`).
    """

    NAME = LEASE_NAME

    def __init__(self, location: str | Path | CacheLocation) -> None:
        where = CacheLocation.parse(location)
        self.lease = StoreLease(where) if where.kind == "url" else None
        self.path = local_path(where.text) / self.NAME if self.lease is None else None
        self.held = False

    def check(self) -> None:
        """Raise ``CacheError`` if an object-store lease was lost meanwhile (a lock file is not)."""
        if self.lease is not None:
            self.lease.check()

    def acquire(self) -> CacheLock:
        if self.lease is not None:
            self.lease.acquire()
            self.held = True
            return self
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = self.path.with_name(f"{self.NAME}.{me['pid']}.tmp")
        try:
            tmp.write_text(json.dumps(me))  # inside: a full disk must not leave it behind
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
                    f"{self.path.parent}: another process is writing this cache (pid "
                    f"{other.get('pid')} on {other.get('host')}, since {other.get('since')}); wait "
                    f"for it to finish, or remove {self.path} if that process is gone"
                ) from None
            self.held = True
            self._remove_stale_temps(me["pid"])
            return self
        raise CacheError(f"{self.path}: could not take the writer lock")

    def _remove_stale_temps(self, mine: int) -> None:
        """Delete lock temp files of writers killed between writing and unlinking them (a kill
        can land there; the lock itself is then taken over, its temp file would stay forever)."""
        for tmp in self.path.parent.glob(f"{self.NAME}.*.tmp"):
            try:
                pid = int(tmp.name[len(self.NAME) + 1 : -len(".tmp")])
            except ValueError:
                continue
            if pid != mine and not _pid_alive(pid):
                tmp.unlink(missing_ok=True)

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
