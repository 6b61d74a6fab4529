"""What a cache's store holds: its own objects (the metadata and the chunks its header implies),
a writer's bookkeeping, and anything else (foreign objects, never copied)."""

from __future__ import annotations

import json
from typing import Any

from pipeline.cache.header import CacheHeader, expected_arrays
from pipeline.cache.layout import CREATING_MARKER
from pipeline.cache.lock import LEASE_NAME
from pipeline.cache.store_keys import COPY_MARKER

META = "zarr.json"


def is_meta(key: str) -> bool:
    return key == META or key.endswith("/" + META)


def is_bookkeeping(key: str) -> bool:
    """The writer lock/lease, the creation and unfinished-copy markers and zarr's temp files of a
    killed write (``*.partial``): never copied, never part of a cache's content."""
    name = key.rsplit("/", 1)[-1]
    return (
        name.startswith(LEASE_NAME)
        or name in (CREATING_MARKER, COPY_MARKER)
        or name.endswith(".partial")
    )


def own_keys(h: CacheHeader) -> set[str]:
    """Every key a cache with header ``h`` may hold: its metadata and the chunks it implies.

    A cache is exactly these (old caches lack some ids/labels chunks); anything else in its
    store is not the cache's and is never copied.
    """
    keys = {META} | ({f"members/{META}"} if h.members else set())
    keys |= {f"members/{m.index}/{META}" for m in h.members}
    for name, shape, _, chunks in expected_arrays(h):
        keys.add(f"{name}/{META}")
        tail = "/0" * (len(shape) - 1)  # every array is chunked along its first axis only
        n_chunks = -(-shape[0] // chunks[0])
        keys |= {f"{name}/c/{i}{tail}" for i in range(n_chunks)}
    return keys


def foreign_keys(sizes: dict[str, int], h: CacheHeader) -> list[str]:
    """The stored keys that are neither the cache's own nor a writer's bookkeeping."""
    own = own_keys(h)
    return sorted(k for k in sizes if k not in own and not is_bookkeeping(k))


def some_keys(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def json_or_error(data: bytes | None) -> Any:
    """The parsed JSON, or the exception that parsing raised (deep nesting included)."""
    try:
        return json.loads(data or b"")
    except (ValueError, RecursionError) as e:
        return e
