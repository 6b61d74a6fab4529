"""``cache verify``: check a cache end to end, and report every problem found.

:func:`verify_cache` reads every chunk (zstd + crc32c: a flipped byte fails, named by its key),
checks the metadata against the format schema, that every chunk a done shard needs is present,
array shapes, dtypes and class counts against the header, the done flags against ``complete``,
logits finite and labels within ``0..C-1``, every ``zarr.json`` parsing and (complete caches)
equal to its consolidated copy, and optionally the dataset (fingerprint, ids and labels).
Shards not marked done are pending, not missing: the done flags are read before the store is
listed for the data chunks, so a writer finishing shards meanwhile is not taken for damage. The
chunk-level reads and checks are in :mod:`pipeline.cache.verify_chunks`.

This module imports without torch (the dataset check imports :mod:`pipeline.datasets`, numpy only).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.abc.store import Store

from pipeline.cache.header import ATTR_KEY, CacheHeader, expected_arrays
from pipeline.cache.layout import CREATING_MARKER
from pipeline.cache.location import MAX_METADATA_BYTES, CacheLocation
from pipeline.cache.lock import LEASE_NAME
from pipeline.cache.objects import (
    META,
    foreign_keys,
    is_bookkeeping,
    is_meta,
    json_or_error,
    own_keys,
    some_keys,
)
from pipeline.cache.reports import VerifyReport
from pipeline.cache.store_keys import COPY_MARKER, get_bytes, key_sizes
from pipeline.cache.verify_chunks import check_arrays, read_data, read_done_flags
from pipeline.data.content import DIGESTS_ARRAY
from pipeline.data.lazy import is_lazy
from pipeline.data.stream import rehash_content
from pipeline.errors import CacheError, KDError, StorageError

if TYPE_CHECKING:
    from pipeline.datasets import Dataset


def verify_cache(
    location: str | Path | CacheLocation,
    dataset: str | None = None,
    data_dir: str | None = None,
    progress: bool = False,
    copying: bool = False,
) -> VerifyReport:
    """Check a cache end to end; see the module docstring. Never raises for a problem with the cache
    itself; a storage failure (``StorageError``) is raised.

    Args:
        dataset: a dataset spec whose fingerprint must match the cache's (e.g. the transfer set you
            hold).
        progress: show a progress bar over the chunks.
        copying: the copy that is writing the cache verifies it: its unfinished-copy marker, which
            it removes once the cache verified, is no problem.
    """
    t0 = time.perf_counter()
    where = CacheLocation.parse(location)
    rep = VerifyReport(where.display)
    try:
        _verify(where, dataset, data_dir, progress, rep, copying)
    except StorageError:
        raise  # the store could not be read (credentials, network, disk): not the cache's fault
    except KDError as e:
        rep.problems.append(str(e))
    rep.seconds = time.perf_counter() - t0
    return rep


def _verify(
    where: CacheLocation,
    dataset: str | None,
    data_dir: str | None,
    progress: bool,
    rep: VerifyReport,
    copying: bool = False,
) -> None:
    """The checks, in order; one that finds the cache unreadable (``CacheError``) stops the rest."""
    store, sizes = _stored_objects(where)
    if COPY_MARKER in sizes and not copying:
        rep.problems.append(
            f"{COPY_MARKER} present: an unfinished copy (a `kd-pipeline cache copy` into it was "
            "interrupted or did not verify); re-run that copy to complete it, or remove it"
        )
    _check_keys(sizes, rep)
    if rep.problems:
        return
    group, h = _read_verified_header(store, where)
    rep.header = h
    foreign = foreign_keys(sizes, h)
    if foreign:
        rep.problems.append(
            f"{len(foreign)} object(s) are not part of the cache "
            f"({some_keys(foreign)}); a cache holds only its metadata and the chunks "
            "its header implies"
        )
    # zarr reads an array without its parent groups' metadata, so nothing else would notice.
    lost = sorted(k for k in own_keys(h) if is_meta(k) and k not in sizes)
    if lost:
        rep.problems.append(
            f"metadata {some_keys(lost)} is missing; the cache's Zarr hierarchy is "
            "incomplete (a copy that did not finish, or damage): get a good copy"
        )
    expected = expected_arrays(h)
    _check_metadata(store, sizes, h, rep)
    _check_group_metadata(store, h, sizes, rep)
    arrays = check_arrays(group, expected, rep)
    done = read_done_flags(arrays, h, sizes, rep)
    # Listed again after the flags: a writer writes a shard's chunks before its flag, so every
    # chunk a flag just read promises is in this listing (unless it really is missing).
    sizes = key_sizes(store)
    data = None if not dataset else _load_dataset(dataset, data_dir)
    values = read_data(arrays, expected, h, done, sizes, rep, progress, data)
    _check_completion(h, done, any(is_bookkeeping(k) for k in sizes), rep)
    if data is not None:
        _check_dataset(h, data, values, rep)
    # Another dataset (its fingerprint reported by _check_dataset: a file added to a folder, say)
    # has other rows: comparing its content row by row with the cache's digests means nothing.
    same = data is not None and data.fingerprint == h.dataset.fingerprint
    if same and is_lazy(data.x) and DIGESTS_ARRAY in arrays:
        # A lazy dataset's content: decoded again and compared with the digests stage one stored.
        shards = np.flatnonzero(np.logical_or.reduce(list(done.values()))) if done else []
        problems, content = rehash_content(data, arrays[DIGESTS_ARRAY][:], shards, h.rows_per_shard)
        rep.problems += problems
        if content and not problems:
            rep.notes.append(f"dataset content matches ({len(shards)} shards re-hashed, {content})")


def _stored_objects(where: CacheLocation) -> tuple[Store, dict[str, int]]:
    """The cache's read-only store (a zip is validated here) and {key: size} of everything in it."""
    if not where.exists():
        raise CacheError(f"{where}: no such cache")
    store = where.open("r")
    sizes = key_sizes(store)
    if META not in sizes:
        raise CacheError(
            f"{where}: no zarr.json at its root: not a cache, or a copy that did not "
            "finish (re-run `kd-pipeline cache copy` to complete it)"
        )
    return store, sizes


def _check_keys(sizes: dict[str, int], rep: VerifyReport) -> None:
    """Oversized metadata, an interrupted creation (problems) and a writer's lock (a note)."""
    for key, size in sizes.items():
        if is_meta(key) and size > MAX_METADATA_BYTES:
            rep.problems.append(f"metadata {key} is {size} bytes (limit {MAX_METADATA_BYTES})")
        if key.rsplit("/", 1)[-1] == CREATING_MARKER:
            rep.problems.append(
                f"{key} present: the cache's creation was interrupted; re-run cache-logits"
            )
        elif key.rsplit("/", 1)[-1].startswith(LEASE_NAME):
            rep.notes.append(f"{key} present: a writer is running, or one was interrupted")


def _check_group_metadata(
    store: Store, h: CacheHeader, sizes: dict[str, int], rep: VerifyReport
) -> None:
    """Read the groups' own metadata (``members/zarr.json``, ...) through the guard, which checks
    it: zarr opens arrays without them, so no other check would read them."""
    arrays = {e[0] for e in expected_arrays(h)}
    for key in sorted(k for k in own_keys(h) if is_meta(k) and k in sizes and k != META):
        if key.rpartition("/")[0] in arrays:
            continue  # read, and reported by name, when its array is opened
        try:
            get_bytes(store, key)
        except StorageError:
            raise
        except KDError as e:
            rep.problems.append(str(e))


def _read_verified_header(store: Store, where: CacheLocation) -> tuple[zarr.Group, CacheHeader]:
    """The root group and its header, checked against the format schema."""
    try:
        # zarr_format=3: one read (see LogitCache: a guessed format leaves failed reads behind).
        group = zarr.open_group(store, mode="r", use_consolidated=False, zarr_format=3)
        attrs = group.attrs.get(ATTR_KEY)
    except KDError:
        raise  # the guard's own message names the document and what is wrong with it
    except Exception as e:  # noqa: BLE001 - unparsable JSON, wrong zarr format, ...
        raise CacheError(
            f"{where}: zarr.json does not parse as Zarr v3 group metadata ({type(e).__name__}: {e})"
        ) from None
    return group, CacheHeader.from_dict(attrs, where.display)


def _check_metadata(store: Store, sizes: dict[str, int], h: CacheHeader, rep: VerifyReport) -> None:
    """Every array's and group's ``zarr.json`` parses and equals its consolidated copy.

    Metadata has no checksum, and zarr ignores keys it does not know, so an altered byte can read
    as a default (a codec option, a group nobody opens). A complete cache's root ``zarr.json``
    holds a copy of every other ``zarr.json`` (consolidated when it was completed): a difference
    means one of the two was altered. A partial cache has no such copy yet: parsing only.
    """
    root = json_or_error(get_bytes(store, META))
    copies = (
        ((root.get("consolidated_metadata") or {}).get("metadata") or {})
        if isinstance(root, dict) and h.complete
        else {}
    )
    for key in sorted(k for k in sizes if is_meta(k) and k != META and not is_bookkeeping(k)):
        if sizes[key] > MAX_METADATA_BYTES:
            continue  # a problem already (_check_keys), and not to be parsed
        try:
            stored = json_or_error(get_bytes(store, key))
        except StorageError:
            raise
        except KDError:
            continue  # the read guard refused it: reported by name with its array or group
        if isinstance(stored, Exception):
            rep.problems.append(
                f"metadata {key} does not parse ({type(stored).__name__}: {str(stored)[:120]})"
            )
            continue
        copy = copies.get(key.removesuffix("/" + META))
        if copy is None:
            continue  # none to compare with: partial, or consolidated before this array existed
        # zarr adds an empty "consolidated_metadata" to a group's copy; nothing else differs.
        if _plain(stored) != _plain(copy):
            rep.problems.append(
                f"metadata {key} differs from its copy consolidated in {META} "
                "(one of them was altered)"
            )


def _plain(meta: Any) -> Any:
    return (
        {k: v for k, v in meta.items() if k != "consolidated_metadata"}
        if isinstance(meta, dict)
        else meta
    )


def _check_completion(
    h: CacheHeader, done: dict[int, np.ndarray], writer: bool, rep: VerifyReport
) -> None:
    """The header's ``complete`` against the done flags (a partial cache is a note, not a problem).

    Args:
        writer: a writer's lock or lease is present: the shards not done are being filled.
    """
    total = h.n_shards * len(h.members)
    written = sum(int(d.sum()) for d in done.values())
    if h.complete and written != total:
        missing = [
            f"member {m} shards {np.flatnonzero(~d)[:10].tolist()}"
            for m, d in done.items()
            if not d.all()
        ]
        rep.problems.append(
            f"the header says complete, but {total - written}/{total} "
            "member-shards are not marked done: " + "; ".join(missing)
        )
    elif not h.complete:
        pending = (
            f"the other {total - written} are pending: a writer holds the lock and is filling them"
            if writer
            else "resume it with cache-logits"
        )
        rep.notes.append(f"partial cache: {written}/{total} member-shards done ({pending})")


def _load_dataset(spec: str, data_dir: str | None) -> Dataset:
    from pipeline.datasets import load_dataset  # numpy only, but not needed without --dataset

    return load_dataset(spec, data_dir)


def _check_dataset(
    h: CacheHeader, data: Dataset, values: dict[str, np.ndarray], rep: VerifyReport
) -> None:
    """The given dataset against the one the cache was made on: fingerprint, then ids and labels.

    The fingerprint covers the dataset's inputs and labels, the header only records it: ids and
    labels rewritten in the cache are found by comparing the arrays themselves.
    """
    if data.fingerprint != h.dataset.fingerprint:
        rep.problems.append(
            f"dataset {data.spec} has fingerprint {data.fingerprint}; the cache "
            f"was made on {h.dataset.spec} with fingerprint "
            f"{h.dataset.fingerprint}"
        )
        return
    rep.notes.append(f"dataset {data.spec} matches ({data.fingerprint})")
    for name, theirs in (("ids", data.ids), ("labels", data.y)):
        ours = values.get(name)
        if ours is None or theirs is None or ours.shape != theirs.shape:
            continue
        bad = np.flatnonzero(ours != theirs)
        if bad.size:
            rep.problems.append(
                f"array {name} differs from the dataset's in {bad.size} rows "
                f"(sample ids {data.ids[bad[:10]].tolist()}: cache "
                f"{ours[bad[:10]].tolist()}, dataset {theirs[bad[:10]].tolist()})"
            )
