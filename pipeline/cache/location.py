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
each opened once per value), :meth:`~CacheLocation.exists`, :attr:`~CacheLocation.name` and
:attr:`~CacheLocation.display`. Its writer lock is ``CacheLock(location)``
(:mod:`pipeline.cache.lock`). Library functions take one and accept a plain ``str`` / ``Path`` for
convenience (``CacheLocation.parse`` at their entry).

Read-only opens use read-only stores, so opening a cache for reading can never write to it. A zip is
validated before zarr sees it (:mod:`pipeline.cache.zipcheck`: no absolute names, no ``..``, no
symlinks, sane sizes). Key-level helpers that work on any of the three stores (list, sizes, get,
put, delete) are in :mod:`pipeline.cache.store_keys`.

This module imports without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore, ZipStore

# MAX_METADATA_BYTES lives with the other read limits in guard.py; lookup and verify import it here.
from pipeline.cache.guard import MAX_METADATA_BYTES as MAX_METADATA_BYTES
from pipeline.cache.guard import GuardedStore, check_bundle
from pipeline.cache.store_keys import COPY_MARKER, list_keys
from pipeline.cache.zipcheck import validate_zip
from pipeline.errors import CacheError
from pipeline.files import location_stem
from pipeline.redact import is_secret, register_secrets, secret_values
from pipeline.redact import redact_options as redact_options

ZIP_SUFFIX = ".zip"

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


def open_store(
    location: str | Path | CacheLocation,
    mode: Literal["r", "w"] = "r",
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """``CacheLocation.parse(location, storage_options).open(mode)``: for one-off uses (tests)."""
    return CacheLocation.parse(location, storage_options).open(mode)
