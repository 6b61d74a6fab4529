"""``cache ls``: the caches under a directory or URL prefix, one summary each."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache.header import CacheHeader
from pipeline.cache.location import ZIP_SUFFIX, CacheLocation
from pipeline.cache.objects import META, is_meta
from pipeline.cache.read import LogitCache
from pipeline.cache.store_keys import key_sizes
from pipeline.errors import CacheError, explain


@dataclass
class CacheSummary:
    location: str
    header: CacheHeader | None
    size: int
    shards_done: int = 0
    error: str | None = None

    @property
    def unreadable(self) -> bool:
        return self.header is None

    def line(self) -> str:
        if self.header is None and str(self.error).startswith("INCOMPLETE:"):
            return f"{self.location}  {self.error}"  # an unfinished copy says so, not "unreadable"
        if self.header is None:
            return f"{self.location}  UNREADABLE: {self.error}"
        h = self.header
        total = h.n_shards * len(h.members)
        status = "complete" if h.complete else f"PARTIAL {self.shards_done}/{total}"
        specs = ", ".join(str(m.model_spec) for m in h.members)
        return (
            f"{self.location}  {status}  members={len(h.members)} ({specs})  "
            f"dataset={h.dataset.spec}  N={h.n}  classes={h.num_classes}  "
            f"size={_human(self.size)}"
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _summary(location: CacheLocation, size: int | None = None) -> CacheSummary | None:
    """One cache's summary; a damaged or unreadable one is listed with the reason, not raised."""
    try:
        cache = LogitCache(location, allow_partial=True)
        # Inside the try: a complete header with a flag not done is refused here, and listed so.
        done = sum(int(cache.done_flags(m.index).sum()) for m in cache.members)
        if size is None:
            size = sum(key_sizes(cache.store).values())
    except Exception as e:  # noqa: BLE001 - one bad cache must not end the listing
        if "no kd-pipeline cache header" in str(e):
            return None  # a Zarr group, but not ours
        reason = explain(e) or e
        text = str(reason).removeprefix(f"{location.display}: ").splitlines()[0]
        return CacheSummary(location.display, None, size or 0, error=text)
    return CacheSummary(location.display, cache.header, size, done)


def list_caches(prefix: str | Path | CacheLocation) -> list[CacheSummary]:
    """The caches under a directory or URL prefix (a cache's own location lists itself), sorted."""
    where = CacheLocation.parse(prefix)
    if where.kind == "zip":
        s = _summary(where)
        return [s] if s else []
    if not where.exists():
        raise CacheError(f"{where}: nothing there to list")
    if where.kind == "url":
        return _list_url(where)
    out = []
    for dirpath, dirnames, filenames in os.walk(where.local_path):
        if META in filenames:
            s = _summary(CacheLocation.parse(dirpath))
            if s is not None:
                out.append(s)
                dirnames[:] = []  # do not descend into a cache's arrays
                continue
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith(ZIP_SUFFIX) and not f.endswith(
                ".partial" + ZIP_SUFFIX
            ):  # not a pack in progress
                bundle = Path(dirpath) / f
                s = _summary(CacheLocation.parse(bundle), bundle.stat().st_size)
                if s is not None:
                    out.append(s)
    return sorted(out, key=lambda s: s.location)


def _list_url(where: CacheLocation) -> list[CacheSummary]:
    sizes = key_sizes(where.open("r"))
    found: list[CacheSummary] = []
    roots: list[str] = []
    # Shallowest zarr.json first: once a cache's root is found, the metadata of its arrays is
    # skipped.
    for key in sorted((k for k in sizes if is_meta(k)), key=lambda k: (k.count("/"), k)):
        root = posixpath.dirname(key)
        if any(root.startswith(r + "/") for r in roots):
            continue
        under = {k: v for k, v in sizes.items() if not root or k.startswith(root + "/")}
        s = _summary(where.child(root) if root else where, sum(under.values()))
        if s is not None:
            if not root:
                return [s]  # the prefix is itself a cache
            roots.append(root)
            found.append(s)
    return sorted(found, key=lambda s: s.location)
