"""Key-level helpers over any of the three stores: list, sizes, get, put, delete.

They work on a directory, a bundle or an object store alike. Here too is the unfinished copy's
marker key (:data:`COPY_MARKER`), refused by every reader.

This module imports without torch.
"""

from __future__ import annotations

import json

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, ZipStore

from pipeline.cache.guard import GuardedStore
from pipeline.errors import CacheError, storage_errors

# Present from a `cache copy`'s first write until its destination verified: a store holding it is
# an unfinished copy, refused by every reader (its JSON names the source and the source's identity).
COPY_MARKER = "kd-copy-incomplete"


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
