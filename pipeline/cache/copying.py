"""``cache copy`` and ``cache pack``: copy a cache between two locations, resumably; verify it.

:func:`copy_cache` streams object by object, skips objects already at the destination with the
same bytes (how an interrupted copy resumes), writes the metadata (every ``zarr.json``, the root's
last) after the data so a half copy is never a readable cache, then verifies the destination.
A ``.zarr.zip`` destination is written once (:mod:`pipeline.cache.bundle`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.cache.bundle import copy_to_zip
from pipeline.cache.copy_plan import CopyPlan, checksummed_arrays, redacted_root
from pipeline.cache.guard import read_json
from pipeline.cache.header import ATTR_KEY, CacheHeader
from pipeline.cache.layout import CREATING_MARKER
from pipeline.cache.location import CacheLocation
from pipeline.cache.lock import LEASE_NAME, CacheLock
from pipeline.cache.objects import (
    META,
    foreign_keys,
    is_bookkeeping,
    is_meta,
    json_or_error,
    some_keys,
)
from pipeline.cache.reports import CopyResult, VerifyReport
from pipeline.cache.store_keys import COPY_MARKER, delete_key, get_bytes, key_sizes, put_bytes
from pipeline.cache.verify import verify_cache
from pipeline.errors import CacheError, KDError, storage_errors
from pipeline.progress import progress_bar

COPY_CONCURRENCY = 16  # objects in flight at once while copying


def copy_cache(
    src: str | Path | CacheLocation,
    dst: str | Path | CacheLocation,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CopyResult:
    """Copy a cache between any two locations (dir, ``.zarr.zip``, ``s3://``), resumably; verify it.

    A directory or object-store destination is marked unfinished (:data:`COPY_MARKER`) before its
    first object is written and unmarked only once it verified, so a copy that is killed, fails
    or does not verify is refused by every reader; re-running the copy resumes it. A destination
    that holds anything else (another cache, other objects, an unfinished copy of another
    source) is refused before anything is written. Every source object passes its checks (the
    read guard's, and its chunk checksum) before it is written anywhere; a header's recorded
    credentials are never carried over.

    Raises:
        CacheError: the source is not a cache, is being created or is an unfinished copy; the
            destination holds something else; a source object fails its checks; or the copy does
            not verify (with the verify report).
    """
    t0 = time.perf_counter()
    source_at, target_at = CacheLocation.parse(src), CacheLocation.parse(dst)
    if not source_at.exists():
        raise CacheError(f"{source_at}: no such cache")
    source = source_at.open("r")
    sizes = key_sizes(source)
    if any(k.rsplit("/", 1)[-1] == CREATING_MARKER for k in sizes):
        raise CacheError(
            f"{source_at}: the cache is still being created (or its creation was "
            "interrupted); finish it with cache-logits first"
        )
    if COPY_MARKER in sizes:
        raise CacheError(
            f"{source_at}: an unfinished copy (a `kd-pipeline cache copy` into it did not "
            "finish or did not verify); complete it by re-running that copy, then copy it"
        )
    if any(k.rsplit("/", 1)[-1].startswith(LEASE_NAME) for k in sizes):
        log(
            f"warning: {source_at} holds a writer lock: a writer may be running; the copy is of "
            "what is there now"
        )
    if META not in sizes:
        raise CacheError(f"{source_at}: no zarr.json at its root; not a cache")
    root_meta = sync(read_json(source, META, source_at.display))
    attrs = root_meta.get("attributes") if isinstance(root_meta, dict) else None
    src_header = CacheHeader.from_dict(
        attrs.get(ATTR_KEY) if isinstance(attrs, dict) else None, source_at.display
    )
    foreign = foreign_keys(sizes, src_header)
    if foreign:
        # Only the cache's own keys are ever copied; a source holding more is not a sound cache.
        raise CacheError(
            f"{source_at} holds {len(foreign)} object(s) that are not part of the "
            f"cache ({some_keys(foreign)}); a cache holds only its metadata and the "
            "chunks its header implies. Refusing to copy it: remove them from the "
            "source, or ask its sender for a bundle made by `kd-pipeline cache pack`"
        )
    keys = [k for k in sizes if not is_bookkeeping(k)]
    data_keys = [k for k in keys if not is_meta(k)]
    # Metadata last, deepest first, the root's zarr.json at the very end.
    meta_keys = sorted((k for k in keys if is_meta(k)), key=lambda k: (-k.count("/"), k))
    plan = CopyPlan(source, sizes, redacted_root(root_meta), checksummed_arrays(source, src_header))
    with storage_errors(target_at.display):  # failures writing name the destination
        if target_at.kind == "zip":
            copied, skipped, nbytes = copy_to_zip(plan, data_keys + meta_keys, target_at, progress)
            report = _verify_copy(plan, keys, target_at, progress)
        else:
            copied, skipped, nbytes, report = _copy_to_store(
                plan, data_keys, meta_keys, src_header, source_at, target_at, progress
            )
    return CopyResult(
        source_at.display,
        target_at.display,
        copied,
        skipped,
        nbytes,
        time.perf_counter() - t0,
        report,
    )


def copy_identity(header: Any) -> str | None:
    """What makes two cache headers the same cache at possibly different states: every field but
    those a writer changes as it fills the cache (``complete``, ``completed_at``) and the recorded
    ``command``. None for something that is not a header."""
    if not isinstance(header, dict):
        return None
    fixed = {k: v for k, v in header.items() if k not in ("complete", "completed_at", "command")}
    return "sha256:" + hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


def _verify_copy(
    plan: CopyPlan,
    keys: list[str],
    target_at: CacheLocation,
    progress: bool,
    copying: bool = False,
) -> VerifyReport:
    """Verify the destination and compare its objects' sizes with the source's.

    Raises:
        CacheError: it does not verify (with the report).
    """
    report = verify_cache(target_at, progress=progress, copying=copying)
    if report.ok:
        dst_sizes = {
            k: s for k, s in key_sizes(target_at.open("r")).items() if not is_bookkeeping(k)
        }
        differ = sorted(k for k in keys if dst_sizes.get(k) != plan.expected_size(k))
        if differ:
            report.problems.append(
                f"{len(differ)} objects differ in size from the source: {differ[:5]}"
            )
    if not report.ok:
        marked = (
            f" It stays marked unfinished ({COPY_MARKER}), so nothing reads it;" if copying else ""
        )
        raise CacheError(
            f"the copy at {target_at} does not verify.{marked} check the source with "
            "`kd-pipeline cache verify`, then re-run the copy to repair it, or remove "
            f"{target_at}:\n{report.format()}"
        )
    return report


def _check_destination(
    target: Store, dst: CacheLocation, src_header: CacheHeader, source_at: CacheLocation
) -> dict[str, int]:
    """What the destination holds ({key: size}, bookkeeping left out), if a copy may write there.

    A copy may write into an empty location, into an unfinished copy of the same cache, or over
    the same cache (an earlier or equal state of it: the copy brings it up to date).

    Raises:
        CacheError: anything else (another cache, other objects, an unfinished copy of another
            cache), before anything is written.
    """
    listed = key_sizes(target)
    have = {k: s for k, s in listed.items() if not is_bookkeeping(k)}
    ours = copy_identity(src_header.to_dict())
    if COPY_MARKER in listed:
        marker = json_or_error(get_bytes(target, COPY_MARKER))
        marker = marker if isinstance(marker, dict) else {}
        if marker.get("identity") != ours:
            raise CacheError(
                f"{dst} is an unfinished copy of another cache ({marker.get('source', '?')}), "
                f"not of {source_at}; copy to a new location, or remove {dst} first"
            )
        return have  # resume it
    if not have:
        return have
    if META not in have:
        raise CacheError(
            f"{dst} already holds other objects ({some_keys(sorted(have), 3)}) and is not a "
            "cache; copy into a new location inside it, e.g. "
            f"{dst.text}/{_name_of(src_header)}"
        )
    try:
        found = sync(read_json(target, META, dst.display))
        theirs = (found.get("attributes") or {}).get(ATTR_KEY)
    except (KDError, AttributeError):  # not JSON, too big or deep, not an object
        theirs = None
    if copy_identity(theirs) != ours:
        raise CacheError(
            f"{dst} already holds something else (another cache, or something that is not "
            f"a cache); refusing to write over it. Copy {source_at} to a new location, or "
            f"remove {dst} first"
        )
    return have


def _copy_to_store(
    plan: CopyPlan,
    data_keys: list[str],
    meta_keys: list[str],
    src_header: CacheHeader,
    source_at: CacheLocation,
    dst: CacheLocation,
    progress: bool,
) -> tuple[int, int, int, VerifyReport]:
    if dst.kind != "url":
        dst.local_path.mkdir(parents=True, exist_ok=True)
    target = dst.open("w")
    with CacheLock(dst):  # no cache-logits (or other copy) writes it meanwhile
        have = _check_destination(target, dst, src_header, source_at)
        # The marker goes first and leaves last: until the copy verified, every reader refuses
        # the destination (a killed copy never looks complete), and a re-run knows it as ours.
        marker = {"source": source_at.display, "identity": copy_identity(src_header.to_dict())}
        put_bytes(target, COPY_MARKER, json.dumps(marker).encode())
        counts = {"copied": 0, "skipped": 0, "bytes": 0}
        keys = data_keys + meta_keys
        bar = progress_bar(
            total=sum(plan.sizes[k] for k in keys),
            enabled=progress,
            unit="B",
            unit_scale=True,
            desc="copy",
        )
        try:
            # Data objects in concurrent batches (an object store's latency, not its bandwidth,
            # bounds a serial copy); metadata after them, one by one in order, the root's zarr.json
            # last.
            for i in range(0, len(data_keys), COPY_CONCURRENCY):
                batch = data_keys[i : i + COPY_CONCURRENCY]
                sync(
                    _gather(
                        *(_copy_object(plan.source, target, k, have, counts, plan) for k in batch)
                    )
                )
                bar.update(sum(plan.sizes[k] for k in batch))
            for key in meta_keys:
                sync(_copy_object(plan.source, target, key, have, counts, plan))
                bar.update(plan.sizes[key])
        finally:
            bar.close()
        report = _verify_copy(plan, data_keys + meta_keys, dst, progress, copying=True)
        delete_key(target, COPY_MARKER)
    return counts["copied"], counts["skipped"], counts["bytes"], report


def _name_of(header: CacheHeader) -> str:
    """A destination name suggestion for a cache: its dataset spec, made path-safe."""
    spec = str(header.dataset.spec if header.dataset.spec is not None else "cache")
    return spec.replace(":", "_").replace("/", "_").replace("=", "").replace(",", "-") + ".zarr"


async def _gather(*coros: Any) -> None:
    """Run ``coros`` concurrently (created inside zarr's event loop: sync() runs it there).

    The first failure cancels the rest and every outcome is retrieved, so a failed batch leaves
    no task running on, and no "exception was never retrieved" warning behind.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _copy_object(
    source: Store,
    target: Store,
    key: str,
    have: dict[str, int],
    counts: dict[str, int],
    plan: CopyPlan | None = None,
) -> None:
    """Copy one object unless the destination already holds the same bytes (how a re-run
    resumes); with ``plan``, only once the object passed its checks (nothing unchecked is
    written)."""
    proto = default_buffer_prototype()
    buf = await source.get(key, prototype=proto)
    if buf is None:  # removed from the source since we listed it
        return
    data = buf.to_bytes() if plan is None else plan.check(key, buf.to_bytes())
    if have.get(key) == len(data):
        theirs = await target.get(key, prototype=proto)
        if theirs is not None and theirs.to_bytes() == data:
            counts["skipped"] += 1
            return
    await target.set(key, proto.buffer.from_bytes(data))
    counts["copied"] += 1
    counts["bytes"] += len(data)


def pack_cache(
    src: str | Path | CacheLocation,
    out: str | Path | CacheLocation,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CopyResult:
    """``cache pack``: a single-file ``NAME.zarr.zip`` bundle of a cache (a copy to a zip)."""
    bundle = CacheLocation.parse(out)
    if not bundle.text.endswith(".zarr.zip"):
        raise CacheError(
            f"{bundle}: a bundle's name must end in .zarr.zip (e.g. "
            f"{Path(bundle.text).stem}.zarr.zip)"
        )
    return copy_cache(src, bundle, progress=progress, log=log)
