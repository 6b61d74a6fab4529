"""``cache verify``'s reads: every array opened and checked against the header, every chunk read
(its checksum) and the values read checked (ids, labels, row index, views' parameters, each
member's rows by its storage kind)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import zarr

from pipeline.cache.header import CacheHeader, member_done
from pipeline.cache.reports import VerifyReport
from pipeline.cache.rows import row_index_problems, view_param_problems, view_plan
from pipeline.errors import KDError, StorageError

if TYPE_CHECKING:
    from pipeline.datasets import Dataset
from pipeline.progress import Bar, progress_bar

Expected = list[tuple[str, tuple[int, ...], str, tuple[int, ...]]]  # name, shape, dtype, chunks


def check_arrays(group: zarr.Group, expected: Expected, rep: VerifyReport) -> dict[str, zarr.Array]:
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


def read_done_flags(
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


def read_data(
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
