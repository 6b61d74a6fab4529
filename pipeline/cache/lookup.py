"""What is at a location before a reader opens it: whether a cache, and its header."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from pipeline.cache.header import CacheHeader
from pipeline.cache.layout import CREATING_MARKER, group_header
from pipeline.cache.location import MAX_METADATA_BYTES, CacheLocation, local_path
from pipeline.cache.lock import CacheLock
from pipeline.cache.store_keys import COPY_MARKER, list_keys, refuse_unfinished_copy
from pipeline.errors import CacheError


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


def cache_fingerprint(
    header: CacheHeader | Mapping[str, Any], members: list[int] | None = None
) -> str:
    """Identity of a cache's content (:meth:`CacheHeader.fingerprint`); takes a header dict too."""
    if not isinstance(header, CacheHeader):
        header = CacheHeader.from_dict(dict(header))
    return header.fingerprint(members)
