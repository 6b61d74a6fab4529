"""Sharing caches: verify, copy (and pack into a ``.zarr.zip``), list.

Every function takes cache locations as :class:`~pipeline.cache.location.CacheLocation` values (or
plain strings, parsed without storage options): a directory, a ``.zarr.zip`` bundle or an ``s3://``
URL. Sources are always opened read-only.

- :func:`verify_cache` reads every chunk (zstd + crc32c: a flipped byte fails, named by its key),
  checks the metadata against the format schema, that every chunk a done shard needs is present,
  array shapes, dtypes and class counts against the header, the done flags against ``complete``,
  logits finite and labels within ``0..C-1``, every ``zarr.json`` parsing and (complete caches)
  equal to its consolidated copy, and optionally the dataset (fingerprint, ids and labels).
  Shards not marked done are pending, not missing: the done flags are read before the store is
  listed for the data chunks, so a writer finishing shards meanwhile is not taken for damage.
- :func:`copy_cache` streams object by object, skips objects already at the destination with the
  same bytes (how an interrupted copy resumes), writes the metadata (every ``zarr.json``, the root's
  last) after the data so a half copy is never a readable cache, then verifies the destination.
- :func:`list_caches` finds caches under a prefix, one summary each.

This module imports without torch (the dataset check imports :mod:`pipeline.datasets`, numpy only).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
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
    expected_arrays,
    member_done,
)
from pipeline.cache.guard import read_json
from pipeline.cache.location import (
    COPY_MARKER,
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
from pipeline.cache.rows import row_index_problems, view_param_problems, view_plan
from pipeline.data.content import DIGESTS_ARRAY
from pipeline.data.lazy import is_lazy
from pipeline.data.stream import rehash_content
from pipeline.errors import CacheError, KDError, StorageError, explain, storage_errors

if TYPE_CHECKING:
    from pipeline.datasets import Dataset
from pipeline.progress import Bar, progress_bar
from pipeline.redact import redact_record

META = "zarr.json"
COPY_CONCURRENCY = 16  # objects in flight at once while copying


def _is_meta(key: str) -> bool:
    return key == META or key.endswith("/" + META)


def _is_bookkeeping(key: str) -> bool:
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


def _foreign(sizes: dict[str, int], h: CacheHeader) -> list[str]:
    """The stored keys that are neither the cache's own nor a writer's bookkeeping."""
    own = own_keys(h)
    return sorted(k for k in sizes if k not in own and not _is_bookkeeping(k))


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------------- verify
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
            lines.append(
                f"header     {h.format} v{h.version}: {h.n} rows x {h.num_classes} "
                f"classes x {len(h.members)} member(s), {h.n_shards} shards, {h.dtype}, "
                f"{'complete' if h.complete else 'PARTIAL'}"
            )
        lines.append(
            f"read       {self.chunks_read} chunks, {self.bytes_read / 2**20:.2f} MiB in "
            f"{self.seconds:.2f}s"
        )
        lines += [f"note       {n}" for n in self.notes]
        if self.ok:
            lines.append(
                "result     OK: every chunk read and checksummed, metadata matches the "
                "format schema"
            )
        else:
            lines.append(f"result     {len(self.problems)} PROBLEM(S):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


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


Expected = list[tuple[str, tuple[int, ...], str, tuple[int, ...]]]  # name, shape, dtype, chunks


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
    foreign = _foreign(sizes, h)
    if foreign:
        rep.problems.append(
            f"{len(foreign)} object(s) are not part of the cache "
            f"({_some(foreign)}); a cache holds only its metadata and the chunks "
            "its header implies"
        )
    # zarr reads an array without its parent groups' metadata, so nothing else would notice.
    lost = sorted(k for k in own_keys(h) if _is_meta(k) and k not in sizes)
    if lost:
        rep.problems.append(
            f"metadata {_some(lost)} is missing; the cache's Zarr hierarchy is "
            "incomplete (a copy that did not finish, or damage): get a good copy"
        )
    expected = expected_arrays(h)
    _check_metadata(store, sizes, h, rep)
    _check_group_metadata(store, h, sizes, rep)
    arrays = _check_arrays(group, expected, rep)
    done = _read_done_flags(arrays, h, sizes, rep)
    # Listed again after the flags: a writer writes a shard's chunks before its flag, so every
    # chunk a flag just read promises is in this listing (unless it really is missing).
    sizes = key_sizes(store)
    data = None if not dataset else _load_dataset(dataset, data_dir)
    values = _read_data(arrays, expected, h, done, sizes, rep, progress, data)
    _check_completion(h, done, any(_is_bookkeeping(k) for k in sizes), rep)
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
        if _is_meta(key) and size > MAX_METADATA_BYTES:
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
    for key in sorted(k for k in own_keys(h) if _is_meta(k) and k in sizes and k != META):
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
    root = _json(get_bytes(store, META))
    copies = (
        ((root.get("consolidated_metadata") or {}).get("metadata") or {})
        if isinstance(root, dict) and h.complete
        else {}
    )
    for key in sorted(k for k in sizes if _is_meta(k) and k != META and not _is_bookkeeping(k)):
        if sizes[key] > MAX_METADATA_BYTES:
            continue  # a problem already (_check_keys), and not to be parsed
        try:
            stored = _json(get_bytes(store, key))
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


def _json(data: bytes | None) -> Any:
    """The parsed JSON, or the exception that parsing raised (deep nesting included)."""
    try:
        return json.loads(data or b"")
    except (ValueError, RecursionError) as e:
        return e


def _plain(meta: Any) -> Any:
    return (
        {k: v for k, v in meta.items() if k != "consolidated_metadata"}
        if isinstance(meta, dict)
        else meta
    )


def _check_arrays(
    group: zarr.Group, expected: Expected, rep: VerifyReport
) -> dict[str, zarr.Array]:
    """The expected arrays that exist with the header's shape, dtype and chunks (else: problems)."""
    arrays: dict[str, zarr.Array] = {}
    for name, shape, dtype, chunks in expected:
        try:
            arr = group[name]
        except KeyError:
            rep.problems.append(f"array {name} is missing")
            continue
        except KDError as e:  # its metadata is damaged or exceeds the header (the guard's check)
            rep.problems.append(f"array {name}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - zarr's parse errors (JSON, schema, nesting) vary
            rep.problems.append(
                f"array {name}: its metadata does not parse ({type(e).__name__}: {str(e)[:200]})"
            )
            continue
        if not isinstance(arr, zarr.Array):
            rep.problems.append(f"{name} is a group, expected an array")
            continue
        found = (tuple(arr.shape), str(arr.dtype), tuple(arr.chunks))
        if found != (shape, dtype, chunks):
            rep.problems.append(
                f"array {name} has shape {found[0]}, dtype {found[1]}, chunks "
                f"{found[2]}; the header says shape {shape}, dtype {dtype}, "
                f"chunks {chunks}"
            )
            continue
        arrays[name] = arr
    return arrays


def _member_of(name: str) -> int | None:
    return int(name.split("/")[1]) if name.startswith("members/") else None


def _read_done_flags(
    arrays: dict[str, zarr.Array], h: CacheHeader, sizes: dict[str, int], rep: VerifyReport
) -> dict[int, np.ndarray]:
    """Each member's done flags (a chunk each), read first: they say which logit chunks must be."""
    done: dict[int, np.ndarray] = {}
    for m in h.members:
        name = member_done(m.index)
        if name in arrays:
            done[m.index] = _read_chunks(
                arrays[name], name, h.n_shards, 1, sizes, rep, required=False
            ).astype(bool)
    return done


def _read_data(
    arrays: dict[str, zarr.Array],
    expected: Expected,
    h: CacheHeader,
    done: dict[int, np.ndarray],
    sizes: dict[str, int],
    rep: VerifyReport,
    progress: bool,
    data: Dataset | None,
) -> dict[str, np.ndarray]:
    """Read every chunk of ids, labels and logits (checksums), then check the values read.

    Returns:
        The ids and labels read, by array name, for the dataset check.
    """
    values: dict[str, np.ndarray] = {}
    names = [e[0] for e in expected if e[0] in arrays and not e[0].endswith("/done")]
    chunked = {e[0]: e[3][0] for e in expected}
    # The bar counts exactly the chunks read below (not metadata or done flags): it ends at 100 %.
    total = sum(
        sizes[key]
        for name in names
        for _, key in _chunk_keys(arrays[name], name, h.n_shards)
        if key in sizes
    )
    bar = progress_bar(total=total, enabled=progress, unit="B", unit_scale=True, desc="verify")
    member_arrays: dict[int, dict[str, np.ndarray]] = {}
    try:
        for name in names:
            member = _member_of(name)
            # Every ids, labels and row-index chunk is written when the cache is created, a
            # shard's member chunks before its done flag: those chunks must exist (a not-done
            # shard's are pending).
            required = done.get(member, False) if member is not None else True
            excused = _fill_proven(name, h, data)
            read = _read_chunks(
                arrays[name],
                name,
                h.n_shards,
                chunked[name],
                sizes,
                rep,
                required=required,
                bar=bar,
                excused=excused,
            )
            if member is None:
                _check_values(name, read, h, rep)
                values[name] = read
            else:
                member_arrays.setdefault(member, {})[name.rsplit("/", 1)[1]] = read
    finally:
        bar.close()
    for member, read in member_arrays.items():
        _check_member(member, read, done.get(member), h, rep)
    _check_view_params(values, h, rep)
    return values


def _check_view_params(values: dict[str, np.ndarray], h: CacheHeader, rep: VerifyReport) -> None:
    """Every view's stored parameters against the ones drawn again from the header's seed."""
    if "view_params" not in values or "ids" not in values or h.augment is None:
        return
    try:
        plan = view_plan(h)
    except KDError as e:
        rep.problems.append(f"view_params cannot be drawn again: {e}")
        return
    if plan is not None:
        rep.problems += view_param_problems(plan, values["ids"], values["view_params"])


def _check_member(
    member: int,
    read: dict[str, np.ndarray],
    done: np.ndarray | None,
    h: CacheHeader,
    rep: VerifyReport,
) -> None:
    """The member's stored rows by its storage kind's checks (finite values, class indices in
    range, sorted, log-sum-exps consistent with the kept values), over its finished shards."""
    spec = h.storage(member)
    rows = np.zeros(h.n_rows, dtype=bool)
    for s in np.flatnonzero(done if done is not None else np.ones(h.n_shards, dtype=bool)):
        rows[slice(*h.row_bounds(int(s)))] = True
    row_arrays = {n: a[rows] for n, a in read.items() if n != "fidelity"}
    if len(row_arrays) != len(spec.impl.arrays(spec, h.num_classes, h.dtype)):
        return  # an array could not be opened: reported already
    for problem in spec.impl.check(spec, row_arrays, h.num_classes):
        rep.problems.append(f"member {member} ({spec.text}): {problem}")


def _fill_proven(name: str, h: CacheHeader, data: Dataset | None) -> np.ndarray | None:
    """(S,) bool: labels chunks whose absence the dataset excuses (all class 0 there).

    Caches made before every chunk was stored omitted a chunk equal to the fill value; only the
    cache's own dataset can tell such a chunk from a deleted one, so without ``--dataset`` (or
    with another dataset) none is excused.
    """
    if (
        name != "labels"
        or data is None
        or data.y is None
        or data.fingerprint != h.dataset.fingerprint
        or len(data.y) != h.n
    ):
        return None
    starts = np.arange(h.n_shards) * h.rows_per_shard
    return np.logical_or.reduceat(data.y != 0, starts) == 0


def _check_values(name: str, values: np.ndarray, h: CacheHeader, rep: VerifyReport) -> None:
    """Sample ids must not repeat; labels must be class indices; the row index must point at
    each sample's own rows."""
    if name == "ids" and np.unique(values).size != h.n:
        rep.problems.append(f"array ids holds {h.n - np.unique(values).size} repeated sample ids")
    if name == "labels":
        bad = np.flatnonzero((values < 0) | (values >= h.num_classes))
        if bad.size:
            rep.problems.append(
                f"array labels holds {bad.size} values outside "
                f"0..{h.num_classes - 1} (rows {bad[:10].tolist()} hold "
                f"{values[bad[:10]].tolist()})"
            )
    if name in ("row_start", "row_count") and h.rows is not None:
        per_sample = h.shard_rows // h.rows_per_shard
        other = np.full(h.n, per_sample) if name == "row_start" else np.arange(h.n) * per_sample
        pair = (values, other) if name == "row_start" else (other, values)
        rep.problems += [p for p in row_index_problems(h, *pair) if p.startswith(f"array {name}")]


def _no_bytes(e: Exception) -> str:
    """An error's text without the stored bytes it quotes (zarr's checksum error shows a chunk's
    last 4 bytes): a message never echoes what a file holds, which may not be the cache's."""
    return re.sub(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"", "<bytes>", str(e))[:300]


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


def _chunk_keys(arr: zarr.Array, name: str, n_chunks: int) -> list[tuple[int, str]]:
    """(row block, store key) of each of ``arr``'s ``n_chunks`` row-block chunks."""
    return [
        (i, f"{name}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}")
        for i in range(n_chunks)
    ]


def _read_chunks(
    arr: zarr.Array,
    name: str,
    n_chunks: int,
    rows: int,
    sizes: dict[str, int],
    rep: VerifyReport,
    required: bool | np.ndarray,
    bar: Bar | None = None,
    excused: np.ndarray | None = None,
) -> np.ndarray:
    """Read ``arr`` chunk by chunk (row blocks), recording missing and unreadable chunks by key.

    Args:
        required: whether each chunk must exist (one bool for all, or (n_chunks,) bool).
        excused: (n_chunks,) bool: required chunks whose absence is a note (see ``_fill_proven``).
    """
    n = arr.shape[0]
    rows = arr.chunks[0]  # rows per chunk: samples for ids and labels, rows for member arrays
    present = []
    for i, key in _chunk_keys(arr, name, n_chunks):
        must = required if isinstance(required, bool) else bool(required[i])
        if key in sizes:
            present.append((i, key))
        elif must and excused is not None and excused[i]:
            rep.notes.append(
                f"chunk {key} is absent, and the dataset's labels there are all "
                "class 0 (an older cache did not store such a chunk): sound"
            )
        elif must:
            hint = (
                ""
                if name != "labels"
                else (
                    " (a cache made before every chunk was stored omits an all-class-0 "
                    "labels chunk: "
                    "--dataset SPEC checks that against the data)"
                )
            )
            rep.problems.append(f"chunk {key} is missing{hint}")
    try:
        # The happy path in one call: zarr fetches the chunks concurrently (what matters on an
        # object store).
        out = np.asarray(arr[:])
    except Exception:  # noqa: BLE001 - some chunk is bad: read them one by one to name it
        out = np.zeros(arr.shape, dtype=arr.dtype)
        for i, key in present:
            lo, hi = i * rows, min(n, (i + 1) * rows)
            try:
                out[lo:hi] = arr[lo:hi]
            except StorageError:
                raise  # the store failed, not the chunk
            except Exception as e:  # noqa: BLE001 - crc32c mismatch, zstd failure, truncation
                rep.problems.append(f"chunk {key} is corrupt ({type(e).__name__}: {_no_bytes(e)})")
    for _, key in present:
        rep.chunks_read += 1
        rep.bytes_read += sizes[key]
        if bar is not None:
            bar.update(sizes[key])
    return out


# -------------------------------------------------------------------------------------------- copy
def _same_cache(theirs: object, ours: CacheHeader) -> bool:
    """Whether a destination's header is an earlier or equal state of the source's cache (same
    dataset, same members so far): only then may a copy resume into it."""
    if not isinstance(theirs, dict) or not isinstance(theirs.get("members"), list):
        return False
    a = [m.get("checkpoint_sha256") for m in theirs["members"] if isinstance(m, dict)]
    b = [m.checkpoint_sha256 for m in ours.members]
    return (
        theirs.get("dataset", {}).get("fingerprint") == ours.dataset.fingerprint
        and theirs.get("n") == ours.n
        and a == b[: len(a)]
    )


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
        return (
            f"copied {self.src} -> {self.dst}: {self.copied} objects "
            f"({self.bytes_copied / 2**20:.2f} MiB) written, {self.skipped} already there, in "
            f"{self.seconds:.1f}s; verified: {self.report.chunks_read} chunks OK"
        )


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
    foreign = _foreign(sizes, src_header)
    if foreign:
        # Only the cache's own keys are ever copied; a source holding more is not a sound cache.
        raise CacheError(
            f"{source_at} holds {len(foreign)} object(s) that are not part of the "
            f"cache ({_some(foreign)}); a cache holds only its metadata and the "
            "chunks its header implies. Refusing to copy it: remove them from the "
            "source, or ask its sender for a bundle made by `kd-pipeline cache pack`"
        )
    keys = [k for k in sizes if not _is_bookkeeping(k)]
    data_keys = [k for k in keys if not _is_meta(k)]
    # Metadata last, deepest first, the root's zarr.json at the very end.
    meta_keys = sorted((k for k in keys if _is_meta(k)), key=lambda k: (-k.count("/"), k))
    plan = _CopyPlan(
        source, sizes, _redacted_root(root_meta), _checksummed_arrays(source, src_header)
    )
    with storage_errors(target_at.display):  # failures writing name the destination
        if target_at.kind == "zip":
            copied, skipped, nbytes = _copy_to_zip(plan, data_keys + meta_keys, target_at, progress)
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


@dataclass
class _CopyPlan:
    """What a copy reads and how each object is checked and (the root) rewritten.

    Attributes:
        root: the root ``zarr.json`` as the destination gets it: the source's, or (a header that
            recorded credentials) rewritten without them.
        checksummed: the arrays whose chunks end in a crc32c, checked before they are written.
    """

    source: Store
    sizes: dict[str, int]
    root: bytes | None
    checksummed: frozenset[str]

    def expected_size(self, key: str) -> int:
        return len(self.root) if key == META and self.root is not None else self.sizes[key]

    def check(self, key: str, data: bytes) -> bytes:
        """The bytes to write for ``key`` (read from the source), once they passed their checks.

        Raises:
            CacheError: a chunk whose checksum does not match (its bytes are not echoed).
        """
        if key == META and self.root is not None:
            return self.root
        array = key.rpartition("/c/")[0] if "/c/" in "/" + key else ""
        if array in self.checksummed and not _crc_ok(data):
            raise CacheError(
                f"the source's chunk {key} fails its checksum (crc32c): the source is damaged, "
                "so the copy stopped before writing it. Check the source with `kd-pipeline "
                "cache verify` and get a good copy of it"
            )
        return data


def _crc_ok(data: bytes) -> bool:
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def _checksummed_arrays(source: Store, h: CacheHeader) -> frozenset[str]:
    """The cache's arrays whose codecs end in crc32c (all of them, in every cache kd-pipeline
    wrote), read from their metadata through the read guard."""
    out = set()
    for name, *_ in expected_arrays(h):
        try:
            meta = sync(read_json(source, f"{name}/{META}", name))
        except KDError:
            continue  # damaged metadata: the copy's verification names it
        codecs = meta.get("codecs") if isinstance(meta, dict) else None
        if isinstance(codecs, list) and codecs and _codec_name(codecs[-1]) == "crc32c":
            out.add(name)
    return frozenset(out)


def _codec_name(codec: Any) -> str | None:
    return (
        codec.get("name") if isinstance(codec, dict) else codec if isinstance(codec, str) else None
    )


def _redacted_root(root_meta: Any) -> bytes | None:
    """The source's root ``zarr.json`` without recorded credentials, or None when it has none.

    Caches written before headers were redacted may record ``--storage-option secret=...`` in their
    ``command``: a copy or bundle never carries it on.
    """
    attrs = root_meta.get("attributes") if isinstance(root_meta, dict) else None
    header = attrs.get(ATTR_KEY) if isinstance(attrs, dict) else None
    if not isinstance(header, dict):
        return None
    clean = redact_record(header)
    if clean == header:
        return None
    meta = {**root_meta, "attributes": {**attrs, ATTR_KEY: clean}}
    return json.dumps(meta, indent=2).encode()


def copy_identity(header: Any) -> str | None:
    """What makes two cache headers the same cache at possibly different states: every field but
    those a writer changes as it fills the cache (``complete``, ``completed_at``) and the recorded
    ``command``. None for something that is not a header."""
    if not isinstance(header, dict):
        return None
    fixed = {k: v for k, v in header.items() if k not in ("complete", "completed_at", "command")}
    return "sha256:" + hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


def _verify_copy(
    plan: _CopyPlan,
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
            k: s for k, s in key_sizes(target_at.open("r")).items() if not _is_bookkeeping(k)
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
    have = {k: s for k, s in listed.items() if not _is_bookkeeping(k)}
    ours = copy_identity(src_header.to_dict())
    if COPY_MARKER in listed:
        marker = _json(get_bytes(target, COPY_MARKER))
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
            f"{dst} already holds other objects ({_some(sorted(have), 3)}) and is not a "
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
    plan: _CopyPlan,
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
    with dst.lock():  # no cache-logits (or other copy) writes it meanwhile
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
    plan: _CopyPlan | None = None,
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


def _copy_to_zip(
    plan: _CopyPlan, keys: list[str], dst: CacheLocation, progress: bool
) -> tuple[int, int, int]:
    """Write a bundle once: into ``NAME.partial.zarr.zip``, closed, validated and verified, then
    renamed into place; a bundle that does not verify is removed, so DST never holds an unsound
    bundle."""
    path = dst.local_path
    if path.exists():
        validate_zip(path)
        existing = dst.open("r")
        have = key_sizes(existing)
        # Equal sizes alone do not make the same cache (another cache of the same shape has
        # them): its root metadata (the header) must be what this copy would write.
        same_header = get_bytes(existing, META) == plan.check(META, get_bytes(plan.source, META))
        if (
            same_header
            and all(have.get(k) == plan.expected_size(k) for k in keys)
            and verify_cache(dst).ok
        ):
            return 0, len(keys), 0  # already an identical, sound bundle
        raise CacheError(
            f"{dst} exists and is not a sound copy of the source; bundles are written "
            "once: remove it or choose another name"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name.removesuffix(ZIP_SUFFIX) + ".partial" + ZIP_SUFFIX)
    tmp.unlink(
        missing_ok=True
    )  # a bundle interrupted midway is rewritten whole (a zip cannot be resumed)
    partial = CacheLocation.parse(tmp)
    try:
        nbytes = _write_zip(plan, keys, partial, progress)
        validate_zip(tmp)
        report = verify_cache(partial, progress=progress)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk, an unreadable source: no half bundle stays
        raise
    if not report.ok:
        tmp.unlink(missing_ok=True)
        raise CacheError(
            f"the bundle for {dst} did not verify, so it was not kept; check the "
            "source with `kd-pipeline cache verify`, then pack again:\n"
            f"{report.format()}"
        )
    os.replace(tmp, path)
    return len(keys), 0, nbytes


def _write_zip(plan: _CopyPlan, keys: list[str], partial: CacheLocation, progress: bool) -> int:
    """Write ``keys`` of ``source`` into the new bundle ``partial``; returns the bytes written."""
    z = partial.create_zip()
    nbytes = 0
    bar = progress_bar(
        total=sum(plan.sizes[k] for k in keys),
        enabled=progress,
        unit="B",
        unit_scale=True,
        desc="pack",
    )
    try:
        for key in keys:
            data = get_bytes(plan.source, key)
            if data is None:
                continue
            data = plan.check(key, data)  # nothing unchecked goes into the bundle
            put_bytes(z, key, data)
            nbytes += len(data)
            bar.update(plan.sizes[key])
    finally:
        bar.close()
        z.close()
    return nbytes


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


# ----------------------------------------------------------------------------------------------- ls
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
