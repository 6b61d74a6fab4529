"""Sharing caches: verify, copy (and pack into a ``.zarr.zip``), list.

Every function takes cache locations as :class:`~pipeline.cache.location.CacheLocation` values (or plain
strings, parsed without storage options): a directory, a ``.zarr.zip`` bundle or an ``s3://`` URL. Sources
are always opened read-only.

- :func:`verify_cache` reads every chunk (zstd + crc32c: a flipped byte fails, named by its key), checks the
  metadata against the format schema, that every chunk a done shard needs is present, array shapes, dtypes
  and class counts against the header, the done flags against ``complete``, and optionally the dataset
  fingerprint.
- :func:`copy_cache` streams object by object, skips objects already at the destination with the same bytes
  (how an interrupted copy resumes), writes the metadata (every ``zarr.json``, the root's last) after the
  data so a half copy is never a readable cache, then verifies the destination.
- :func:`list_caches` finds caches under a prefix, one summary each.

This module imports without torch (the dataset check imports :mod:`pipeline.datasets`, numpy only).
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.cache.format import (
    ATTR_KEY,
    CREATING_MARKER,
    CacheHeader,
    LogitCache,
    member_array,
    member_done,
)
from pipeline.cache.location import (
    LEASE_NAME,
    MAX_METADATA_BYTES,
    ZIP_SUFFIX,
    CacheLocation,
    delete_key,
    get_bytes,
    key_sizes,
    put_bytes,
    validate_zip,
)
from pipeline.errors import CacheError, KDError
from pipeline.progress import Bar, progress_bar

META = "zarr.json"
COPY_CONCURRENCY = 16  # objects in flight at once while copying


def _is_meta(key: str) -> bool:
    return key == META or key.endswith("/" + META)


def _is_bookkeeping(key: str) -> bool:
    """The writer lock/lease and the creation marker: never copied, never part of a cache's content."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(LEASE_NAME) or name == CREATING_MARKER


# ----------------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    """What ``cache verify`` found: ``problems`` empty means the cache is sound."""

    location: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    header: CacheHeader | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        h = self.header
        lines = [f"cache      {self.location}"]
        if h is not None:
            lines.append(f"header     {h.format} v{h.version}: {h.n} rows x {h.num_classes} classes x "
                         f"{len(h.members)} member(s), {h.n_shards} shards, {h.dtype}, "
                         f"{'complete' if h.complete else 'PARTIAL'}")
        lines.append(f"read       {self.chunks_read} chunks, {self.bytes_read / 2**20:.2f} MiB in "
                     f"{self.seconds:.2f}s")
        lines += [f"note       {n}" for n in self.notes]
        if self.ok:
            lines.append("result     OK: every chunk read and checksummed, metadata matches the format schema")
        else:
            lines.append(f"result     {len(self.problems)} PROBLEM(S):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def verify_cache(location: str | Path | CacheLocation, dataset: str | None = None,
                 data_dir: str | None = None, progress: bool = False) -> VerifyReport:
    """Check a cache end to end; see the module docstring. Never raises for a problem with the cache itself.

    Args:
        dataset: a dataset spec whose fingerprint must match the cache's (e.g. the transfer set you hold).
        progress: show a progress bar over the chunks.
    """
    t0 = time.perf_counter()
    where = CacheLocation.parse(location)
    rep = VerifyReport(where.display)
    try:
        _verify(where, dataset, data_dir, progress, rep)
    except KDError as e:
        rep.problems.append(str(e))
    rep.seconds = time.perf_counter() - t0
    return rep


Expected = list[tuple[str, tuple[int, ...], str]]  # (array name, shape, dtype) the header implies


def _verify(where: CacheLocation, dataset: str | None, data_dir: str | None, progress: bool,
            rep: VerifyReport) -> None:
    """The checks, in order; one that finds the cache unreadable (``CacheError``) stops the rest."""
    store, sizes = _stored_objects(where)
    _check_keys(sizes, rep)
    if rep.problems:
        return
    group, h = _read_verified_header(store, where)
    rep.header = h
    expected = _expected_arrays(h)
    arrays = _check_arrays(group, expected, h, rep)
    done = _read_done_flags(arrays, h, sizes, rep)
    _read_data(arrays, expected, h, done, sizes, rep, progress)
    _check_completion(h, done, rep)
    if dataset:
        _check_dataset(h, dataset, data_dir, rep)


def _stored_objects(where: CacheLocation) -> tuple[Store, dict[str, int]]:
    """The cache's read-only store (a zip is validated here) and {key: size} of everything in it."""
    if not where.exists():
        raise CacheError(f"{where}: no such cache")
    store = where.open("r")
    sizes = key_sizes(store)
    if META not in sizes:
        raise CacheError(f"{where}: no zarr.json at its root: not a cache, or a copy that did not finish "
                         "(re-run `kd-pipeline cache copy` to complete it)")
    return store, sizes


def _check_keys(sizes: dict[str, int], rep: VerifyReport) -> None:
    """Oversized metadata, an interrupted creation (problems) and a writer's lock (a note)."""
    for key, size in sizes.items():
        if _is_meta(key) and size > MAX_METADATA_BYTES:
            rep.problems.append(f"metadata {key} is {size} bytes (limit {MAX_METADATA_BYTES})")
        if key.rsplit("/", 1)[-1] == CREATING_MARKER:
            rep.problems.append(f"{key} present: the cache's creation was interrupted; re-run cache-logits")
        elif key.rsplit("/", 1)[-1].startswith(LEASE_NAME):
            rep.notes.append(f"{key} present: a writer is running, or one was interrupted")


def _read_verified_header(store: Store, where: CacheLocation) -> tuple[zarr.Group, CacheHeader]:
    """The root group and its header, checked against the format schema."""
    try:
        group = zarr.open_group(store, mode="r", use_consolidated=False)
        attrs = group.attrs.get(ATTR_KEY)
    except Exception as e:  # noqa: BLE001 - unparsable JSON, wrong zarr format, ...
        raise CacheError(f"{where}: zarr.json does not parse as Zarr v3 group metadata "
                         f"({type(e).__name__}: {e})") from None
    return group, CacheHeader.from_dict(attrs, where.display)


def _expected_arrays(h: CacheHeader) -> Expected:
    """Every array the header implies, with its shape and dtype."""
    expected: Expected = [("ids", (h.n,), "int64")]
    if h.labeled:
        expected.append(("labels", (h.n,), "int64"))
    for m in h.members:
        expected.append((member_array(m.index), (h.n, h.num_classes), h.dtype))
        expected.append((member_done(m.index), (h.n_shards,), "uint8"))
    return expected


def _check_arrays(group: zarr.Group, expected: Expected, h: CacheHeader,
                  rep: VerifyReport) -> dict[str, zarr.Array]:
    """The expected arrays that exist with the header's shape, dtype and chunks (others are problems)."""
    arrays: dict[str, zarr.Array] = {}
    for name, shape, dtype in expected:
        try:
            arr = group[name]
        except KeyError:
            rep.problems.append(f"array {name} is missing")
            continue
        if not isinstance(arr, zarr.Array):
            rep.problems.append(f"{name} is a group, expected an array")
            continue
        want_chunks = (1,) if name.endswith("/done") else \
            (h.rows_per_shard,) + ((h.num_classes,) if len(shape) == 2 else ())
        found = (tuple(arr.shape), str(arr.dtype), tuple(arr.chunks))
        if found != (shape, dtype, want_chunks):
            rep.problems.append(f"array {name} has shape {found[0]}, dtype {found[1]}, chunks {found[2]}; "
                                f"the header says shape {shape}, dtype {dtype}, chunks {want_chunks}")
            continue
        arrays[name] = arr
    return arrays


def _read_done_flags(arrays: dict[str, zarr.Array], h: CacheHeader, sizes: dict[str, int],
                     rep: VerifyReport) -> dict[int, np.ndarray]:
    """Each member's done flags (one chunk each), read first: they say which logit chunks must exist."""
    done: dict[int, np.ndarray] = {}
    for m in h.members:
        name = member_done(m.index)
        if name in arrays:
            done[m.index] = _read_chunks(arrays[name], name, h.n_shards, 1, sizes, rep,
                                         required=False).astype(bool)
    return done


def _read_data(arrays: dict[str, zarr.Array], expected: Expected, h: CacheHeader,
               done: dict[int, np.ndarray], sizes: dict[str, int], rep: VerifyReport,
               progress: bool) -> None:
    """Read every chunk of ids, labels and logits (checksums), then check the values read."""
    names = [name for name, _, _ in expected if name in arrays and not name.endswith("/done")]
    # The bar counts exactly the chunks read below (not metadata or done flags): it ends at 100 %.
    total = sum(sizes[key] for name in names
                for _, key in _chunk_keys(arrays[name], name, h.n_shards) if key in sizes)
    bar = progress_bar(total=total, enabled=progress, unit="B", unit_scale=True, desc="verify")
    try:
        for name in names:
            member = int(name.split("/")[1]) if name.startswith("members/") else None
            # ids/labels chunks equal to the fill value (e.g. an all-class-0 labels shard) were not stored
            # by caches made before every chunk was: such a chunk reads as zeros, and repeated ids are
            # checked below.
            required = done.get(member) if member is not None else False
            values = _read_chunks(arrays[name], name, h.n_shards, h.rows_per_shard, sizes, rep,
                                  required=required, bar=bar)
            _check_values(name, member, values, h.n, rep)
    finally:
        bar.close()


def _check_values(name: str, member: int | None, values: np.ndarray, n: int, rep: VerifyReport) -> None:
    """Logits must be finite; sample ids must not repeat."""
    if member is not None and not np.isfinite(values.astype(np.float32)).all():
        bad = np.flatnonzero(~np.isfinite(values.astype(np.float32)).all(axis=1))
        rep.problems.append(f"array {name} holds NaN/inf logits in rows {bad[:10].tolist()}")
    if name == "ids" and np.unique(values).size != n:
        rep.problems.append(f"array ids holds {n - np.unique(values).size} repeated sample ids")


def _check_completion(h: CacheHeader, done: dict[int, np.ndarray], rep: VerifyReport) -> None:
    """The header's ``complete`` against the done flags (a partial cache is a note, not a problem)."""
    total = h.n_shards * len(h.members)
    written = sum(int(d.sum()) for d in done.values())
    if h.complete and written != total:
        missing = [f"member {m} shards {np.flatnonzero(~d)[:10].tolist()}" for m, d in done.items()
                   if not d.all()]
        rep.problems.append(f"the header says complete, but {total - written}/{total} member-shards are "
                            "not marked done: " + "; ".join(missing))
    elif not h.complete:
        rep.notes.append(f"partial cache: {written}/{total} member-shards done (resume it with cache-logits)")


def _check_dataset(h: CacheHeader, dataset: str, data_dir: str | None, rep: VerifyReport) -> None:
    """The given dataset's fingerprint against the one the cache was made on."""
    from pipeline.datasets import load_dataset

    data = load_dataset(dataset, data_dir)
    if data.fingerprint != h.dataset.fingerprint:
        rep.problems.append(f"dataset {dataset} has fingerprint {data.fingerprint}; the cache was made on "
                            f"{h.dataset.spec} with fingerprint {h.dataset.fingerprint}")
    else:
        rep.notes.append(f"dataset {dataset} matches ({data.fingerprint})")


def _chunk_keys(arr: zarr.Array, name: str, n_chunks: int) -> list[tuple[int, str]]:
    """(row block, store key) of each of ``arr``'s ``n_chunks`` row-block chunks."""
    return [(i, f"{name}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}")
            for i in range(n_chunks)]


def _read_chunks(arr: zarr.Array, name: str, n_chunks: int, rows: int, sizes: dict[str, int], rep: VerifyReport,
                 required: bool | np.ndarray, bar: Bar | None = None) -> np.ndarray:
    """Read ``arr`` chunk by chunk (row blocks), recording missing and unreadable chunks by their store key."""
    n = arr.shape[0]
    present = []
    for i, key in _chunk_keys(arr, name, n_chunks):
        must = required if isinstance(required, bool) else bool(required[i])
        if key in sizes:
            present.append((i, key))
        elif must:
            rep.problems.append(f"chunk {key} is missing")
    try:
        # The happy path in one call: zarr fetches the chunks concurrently (what matters on an object store).
        out = np.asarray(arr[:])
    except Exception:  # noqa: BLE001 - some chunk is bad: read them one by one to name it
        out = np.zeros(arr.shape, dtype=arr.dtype)
        for i, key in present:
            lo, hi = i * rows, min(n, (i + 1) * rows)
            try:
                out[lo:hi] = arr[lo:hi]
            except Exception as e:  # noqa: BLE001 - crc32c mismatch, zstd failure, truncation
                rep.problems.append(f"chunk {key} is corrupt ({type(e).__name__}: {e})")
    for _, key in present:
        rep.chunks_read += 1
        rep.bytes_read += sizes[key]
        if bar is not None:
            bar.update(sizes[key])
    return out


# ------------------------------------------------------------------------------------------------------- copy
def _same_cache(theirs: object, ours: CacheHeader) -> bool:
    """Whether a destination's header is an earlier or equal state of the source's cache (same dataset, same
    members so far): only then may a copy resume into it."""
    if not isinstance(theirs, dict) or not isinstance(theirs.get("members"), list):
        return False
    a = [m.get("checkpoint_sha256") for m in theirs["members"] if isinstance(m, dict)]
    b = [m.checkpoint_sha256 for m in ours.members]
    return (theirs.get("dataset", {}).get("fingerprint") == ours.dataset.fingerprint
            and theirs.get("n") == ours.n and a == b[:len(a)])


@dataclass
class CopyResult:
    src: str
    dst: str
    copied: int
    skipped: int
    bytes_copied: int
    seconds: float
    report: VerifyReport

    @property
    def message(self) -> str:
        return (f"copied {self.src} -> {self.dst}: {self.copied} objects ({self.bytes_copied / 2**20:.2f} "
                f"MiB) written, {self.skipped} already there, in {self.seconds:.1f}s; verified: "
                f"{self.report.chunks_read} chunks OK")


def copy_cache(src: str | Path | CacheLocation, dst: str | Path | CacheLocation, progress: bool = True,
               log: Callable[[str], None] = print) -> CopyResult:
    """Copy a cache between any two locations (dir, ``.zarr.zip``, ``s3://``), resumably, then verify it.

    Raises:
        CacheError: the source is not a cache or is being created, the destination holds another cache, or
            the copy does not verify (with the verify report).
    """
    t0 = time.perf_counter()
    source_at, target_at = CacheLocation.parse(src), CacheLocation.parse(dst)
    if not source_at.exists():
        raise CacheError(f"{source_at}: no such cache")
    source = source_at.open("r")
    sizes = key_sizes(source)
    if any(k.rsplit("/", 1)[-1] == CREATING_MARKER for k in sizes):
        raise CacheError(f"{source_at}: the cache is still being created (or its creation was "
                         "interrupted); finish it with cache-logits first")
    if any(k.rsplit("/", 1)[-1].startswith(LEASE_NAME) for k in sizes):
        log(f"warning: {source_at} holds a writer lock: a writer may be running; the copy is of what is "
            "there now")
    if META not in sizes:
        raise CacheError(f"{source_at}: no zarr.json at its root; not a cache")
    root_meta = json.loads(get_bytes(source, META) or b"{}")
    src_header = CacheHeader.from_dict(root_meta.get("attributes", {}).get(ATTR_KEY), source_at.display)
    keys = [k for k in sizes if not _is_bookkeeping(k)]
    data_keys = [k for k in keys if not _is_meta(k)]
    # Metadata last, deepest first, the root's zarr.json at the very end: until it lands, the copy is no
    # cache.
    meta_keys = sorted((k for k in keys if _is_meta(k)), key=lambda k: (-k.count("/"), k))
    if target_at.kind == "zip":
        copied, skipped, nbytes = _copy_to_zip(source, sizes, data_keys + meta_keys, target_at, progress)
    else:
        copied, skipped, nbytes = _copy_to_store(source, sizes, data_keys, meta_keys, src_header,
                                                 target_at, progress)
    report = verify_cache(target_at, progress=progress)
    if report.ok:
        dst_sizes = {k: s for k, s in key_sizes(target_at.open("r")).items() if not _is_bookkeeping(k)}
        differ = sorted(k for k in keys if dst_sizes.get(k) != sizes[k])
        if differ:
            report.problems.append(f"{len(differ)} objects differ in size from the source: {differ[:5]}")
    if not report.ok:
        raise CacheError(f"the copy at {target_at} does not verify; re-run the copy to repair it:\n"
                         f"{report.format()}")
    return CopyResult(source_at.display, target_at.display, copied, skipped, nbytes,
                      time.perf_counter() - t0, report)


def _copy_to_store(source: Store, sizes: dict[str, int], data_keys: list[str], meta_keys: list[str],
                   src_header: CacheHeader, dst: CacheLocation, progress: bool) -> tuple[int, int, int]:
    if dst.kind != "url":
        dst.local_path.mkdir(parents=True, exist_ok=True)
    target = dst.open("w")
    with dst.lock():  # no cache-logits (or other copy) writes it meanwhile
        have = {k: s for k, s in key_sizes(target).items() if not _is_bookkeeping(k)}
        foreign = sorted(k for k in have if k not in sizes)
        if META not in have and foreign:
            # Objects but no cache root: a folder of other things (like `cp SRC DIR/`), not a half copy.
            raise CacheError(f"{dst} already holds other objects ({', '.join(foreign[:3])}, ...) and is not "
                             "a cache; copy into a new location inside it, e.g. "
                             f"{dst.text}/{_name_of(src_header)}")
        if META in have:
            try:
                theirs = json.loads(get_bytes(target, META) or b"{}").get("attributes", {}).get(ATTR_KEY)
            except ValueError:
                theirs = None
            if not _same_cache(theirs, src_header):
                raise CacheError(f"{dst} already holds something else (another cache or not a cache); copy "
                                 "to a new location, or remove it first")
            if get_bytes(target, META) != get_bytes(source, META):
                # The destination's root metadata describes an older state: drop it first so that, until
                # the copy is whole again, the destination is not taken for a complete cache.
                delete_key(target, META)
                have.pop(META)
        counts = {"copied": 0, "skipped": 0, "bytes": 0}
        bar = progress_bar(total=sum(sizes[k] for k in data_keys + meta_keys), enabled=progress,
                           unit="B", unit_scale=True, desc="copy")
        try:
            # Data objects in concurrent batches (an object store's latency, not its bandwidth, bounds a
            # serial copy); metadata after them, one by one in order, the root's zarr.json last.
            for i in range(0, len(data_keys), COPY_CONCURRENCY):
                batch = data_keys[i:i + COPY_CONCURRENCY]
                sync(_gather(*(_copy_object(source, target, k, have, counts) for k in batch)))
                bar.update(sum(sizes[k] for k in batch))
            for key in meta_keys:
                sync(_copy_object(source, target, key, have, counts))
                bar.update(sizes[key])
        finally:
            bar.close()
    return counts["copied"], counts["skipped"], counts["bytes"]


def _name_of(header: CacheHeader) -> str:
    """A destination name suggestion for a cache: its dataset spec, made path-safe."""
    spec = str(header.dataset.spec if header.dataset.spec is not None else "cache")
    return spec.replace(":", "_").replace("/", "_").replace("=", "").replace(",", "-") + ".zarr"


async def _gather(*coros: Any) -> None:
    await asyncio.gather(*coros)  # created inside zarr's event loop (sync() runs it there)


async def _copy_object(source: Store, target: Store, key: str, have: dict[str, int], counts: dict[str, int]) -> None:
    """Copy one object unless the destination already holds the same bytes (how a re-run resumes)."""
    proto = default_buffer_prototype()
    buf = await source.get(key, prototype=proto)
    if buf is None:  # removed from the source since we listed it
        return
    data = buf.to_bytes()
    if have.get(key) == len(data):
        theirs = await target.get(key, prototype=proto)
        if theirs is not None and theirs.to_bytes() == data:
            counts["skipped"] += 1
            return
    await target.set(key, proto.buffer.from_bytes(data))
    counts["copied"] += 1
    counts["bytes"] += len(data)


def _copy_to_zip(source: Store, sizes: dict[str, int], keys: list[str], dst: CacheLocation,
                 progress: bool) -> tuple[int, int, int]:
    """Write a bundle once: into ``NAME.partial.zarr.zip``, closed, validated and verified, then renamed into
    place; a bundle that does not verify is removed, so DST never holds an unsound bundle."""
    path = dst.local_path
    if path.exists():
        validate_zip(path)
        have = key_sizes(dst.open("r"))
        if all(have.get(k) == sizes[k] for k in keys) and verify_cache(dst).ok:
            return 0, len(keys), 0  # already an identical, sound bundle
        raise CacheError(f"{dst} exists and is not a sound copy of the source; bundles are written once: "
                         "remove it or choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name.removesuffix(ZIP_SUFFIX) + ".partial" + ZIP_SUFFIX)
    tmp.unlink(missing_ok=True)  # a bundle interrupted midway is rewritten whole (a zip cannot be resumed)
    partial = CacheLocation.parse(tmp)
    z = partial.create_zip()
    nbytes = 0
    bar = progress_bar(total=sum(sizes[k] for k in keys), enabled=progress, unit="B",
                       unit_scale=True, desc="pack")
    try:
        for key in keys:
            data = get_bytes(source, key)
            if data is None:
                continue
            put_bytes(z, key, data)
            nbytes += len(data)
            bar.update(sizes[key])
    finally:
        bar.close()
        z.close()
    validate_zip(tmp)
    report = verify_cache(partial, progress=progress)
    if not report.ok:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"the bundle for {dst} did not verify, so it was not kept; check the source with "
                         f"`kd-pipeline cache verify`, then pack again:\n{report.format()}")
    os.replace(tmp, path)
    return len(keys), 0, nbytes


def pack_cache(src: str | Path | CacheLocation, out: str | Path | CacheLocation, progress: bool = True,
               log: Callable[[str], None] = print) -> CopyResult:
    """``cache pack``: a single-file ``NAME.zarr.zip`` bundle of a cache (a copy to a zip)."""
    bundle = CacheLocation.parse(out)
    if not bundle.text.endswith(".zarr.zip"):
        raise CacheError(f"{bundle}: a bundle's name must end in .zarr.zip (e.g. "
                         f"{Path(bundle.text).stem}.zarr.zip)")
    return copy_cache(src, bundle, progress=progress, log=log)


# --------------------------------------------------------------------------------------------------------- ls
@dataclass
class CacheSummary:
    location: str
    header: CacheHeader | None
    size: int
    shards_done: int = 0
    error: str | None = None

    def line(self) -> str:
        if self.header is None:
            return f"{self.location}  UNREADABLE: {self.error}"
        h = self.header
        total = h.n_shards * len(h.members)
        status = "complete" if h.complete else f"PARTIAL {self.shards_done}/{total}"
        specs = ", ".join(str(m.model_spec) for m in h.members)
        return (f"{self.location}  {status}  members={len(h.members)} ({specs})  dataset={h.dataset.spec}  "
                f"N={h.n}  classes={h.num_classes}  size={_human(self.size)}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _summary(location: CacheLocation, size: int | None = None) -> CacheSummary | None:
    try:
        cache = LogitCache(location, allow_partial=True)
    except CacheError as e:
        if "no kd-pipeline cache header" in str(e):
            return None  # a Zarr group, but not ours
        return CacheSummary(location.display, None, size or 0, error=str(e))
    done = sum(int(cache.done_flags(m.index).sum()) for m in cache.members)
    if size is None:
        size = sum(key_sizes(cache.store).values())
    return CacheSummary(location.display, cache.header, size, done)


def list_caches(prefix: str | Path | CacheLocation) -> list[CacheSummary]:
    """The caches under a directory or URL prefix (a cache's own location lists just itself), by location."""
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
            if f.endswith(ZIP_SUFFIX) and not f.endswith(".partial" + ZIP_SUFFIX):  # not a pack in progress
                s = _summary(CacheLocation.parse(Path(dirpath) / f), (Path(dirpath) / f).stat().st_size)
                if s is not None:
                    out.append(s)
    return sorted(out, key=lambda s: s.location)


def _list_url(where: CacheLocation) -> list[CacheSummary]:
    sizes = key_sizes(where.open("r"))
    found: list[CacheSummary] = []
    roots: list[str] = []
    # Shallowest zarr.json first: once a cache's root is found, the metadata of its arrays is skipped.
    for key in sorted((k for k in sizes if _is_meta(k)), key=lambda k: (k.count("/"), k)):
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
