"""Creating a cache: its schema, written first (every array at full size, no logits yet).

The format is specified in docs/cache-format.md.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc
from zarr.abc.store import Store

from pipeline import __version__
from pipeline.cache.header import (
    VIEW_PARAMS,
    CacheHeader,
    MemberRecord,
    member_array,
    member_done,
    member_fidelity,
    member_row_arrays,
)
from pipeline.cache.kinds import FIDELITY_FIELDS, StorageSpec
from pipeline.cache.layout import (
    CREATING_MARKER,
    codecs_description,
    group_header,
    logit_codecs,
    now,
    set_header,
)
from pipeline.cache.location import CacheLocation, local_path
from pipeline.cache.lock import CacheLock
from pipeline.cache.store_keys import delete_key, list_keys, put_bytes
from pipeline.data.content import CONTENT_DIGESTS, CONTENT_KEY, DIGEST_BYTES, DIGESTS_ARRAY
from pipeline.errors import CacheError


def create_cache(
    location: str | Path | CacheLocation,
    *,
    dataset: dict,
    ids: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    class_names: Sequence[str],
    members: Sequence[Mapping[str, Any]],
    dtype: str,
    rows_per_shard: int,
    command: str,
    storage: StorageSpec | Sequence[StorageSpec] | None = None,
    seed: int = 0,
    views: int = 1,
    augment: Mapping[str, Any] | None = None,
    view_params: np.ndarray | None = None,
    positions: int = 1,
) -> zarr.Group:
    """Create the store schema-first: every array at full size, ids/labels written, no logits yet.

    Args:
        location: a directory or an object-store URL (see :mod:`pipeline.cache.location`).
        dataset: the transfer set's ``Dataset.describe()``.
        ids: (N,) stable sample ids. labels: (N,) or None.
        members: teacher identities (``LoadedModel.identity()``), one per member.
        storage: how the members' rows are stored (one spec for all, or one per member;
            default dense).
        seed: seeds sampled storage (with the member and the shard) and the views' draws.
        positions: rows per view (token positions of a sequence dataset).
        views: rows per sample (augmented views of each input).
        augment: a view cache's ``augment`` header record (spec, version, parameter schema).
        view_params: (N * views, P) float32, each view's explicit parameters (with ``augment``):
            written here, with the ids, since they depend on no teacher.
    """
    if (augment is None) != (view_params is None):
        raise CacheError("a view cache needs both its augment record and its view parameters")
    where = CacheLocation.parse(location)
    store = _clear_for_creation(where)
    n = int(ids.shape[0])
    header = CacheHeader.new(
        n=n,
        num_classes=int(num_classes),
        class_names=list(class_names),
        rows_per_shard=int(rows_per_shard),
        dtype=dtype,
        codecs=codecs_description(),
        labeled=labels is not None,
        dataset=dataset,
        tool_version=__version__,
        created=now(),
        command=command,
        seed=int(seed),
        views=int(views),
        augment=augment,
        positions=int(positions),
    )
    if storage is None or isinstance(storage, StorageSpec):
        storage = [storage or StorageSpec("dense")] * len(members)
    group = zarr.create_group(store, zarr_format=3)
    # Every chunk is stored, even one equal to the fill value (an all-class-0 labels shard): a
    # present object per shard is what verify and copy check, and a missing one then always means
    # damage.
    kw = {
        "chunks": (rows_per_shard,),
        "compressors": logit_codecs(),
        "config": {"write_empty_chunks": True},
    }
    group.create_array("ids", data=np.asarray(ids, dtype=np.int64), **kw)
    if labels is not None:
        group.create_array("labels", data=np.asarray(labels, dtype=np.int64), **kw)
    per_sample = header.shard_rows // header.rows_per_shard
    group.create_array("row_start", data=np.arange(n, dtype=np.int64) * per_sample, **kw)
    group.create_array("row_count", data=np.full(n, per_sample, dtype=np.int32), **kw)
    if dataset.get(CONTENT_KEY) == CONTENT_DIGESTS:
        # A lazy dataset's per-sample content digests, written with each shard (stage one hashes
        # the inputs it decodes anyway); filled with zeros until then.
        group.create_array(
            DIGESTS_ARRAY,
            shape=(n, DIGEST_BYTES),
            dtype="uint8",
            chunks=(rows_per_shard, DIGEST_BYTES),
            compressors=logit_codecs(),
            config={"write_empty_chunks": True},
        )
    if view_params is not None:
        params = np.asarray(view_params, dtype=np.float32)
        if params.shape != (header.n_rows, len(header.view_params or ())):
            raise CacheError(
                f"view parameters of shape {params.shape}, expected "
                f"({header.n_rows}, {len(header.view_params or ())})"
            )
        group.create_array(
            VIEW_PARAMS, data=params, **{**kw, "chunks": (header.shard_rows, params.shape[1])}
        )
    set_header(group, header)
    for m, spec in zip(members, storage, strict=True):
        add_member_arrays(group, m, spec)
    delete_key(store, CREATING_MARKER)
    return group


def _clear_for_creation(where: CacheLocation) -> Store:
    """Mark ``where`` as being created and clear an interrupted creation; returns its store.

    Until the schema is whole the marker stays, so a kill before then leaves a store that is created
    afresh. The writer lock is never removed.
    """
    if where.kind == "dir":
        root = local_path(where.text)
        root.mkdir(parents=True, exist_ok=True)
        (root / CREATING_MARKER).touch()
        for child in root.iterdir():
            if child.name != CREATING_MARKER and not child.name.startswith(CacheLock.NAME):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        return where.open("w")
    store = where.open("w")
    put_bytes(store, CREATING_MARKER, b"")  # the same protocol, as an object
    for key in list_keys(store):
        if key != CREATING_MARKER and not key.startswith(CacheLock.NAME):
            delete_key(store, key)
    return store


def add_member_arrays(
    group: zarr.Group, identity: Mapping[str, Any], storage: StorageSpec | None = None
) -> MemberRecord:
    """Append a member to the header and create its (empty) row, done and fidelity arrays.

    Args:
        storage: how its rows are stored (default dense); a format 1 cache takes dense only.
    """
    h = group_header(group)
    index = len(h.members)
    spec = storage or StorageSpec("dense")
    entry = {"index": index, "array": member_array(index, _first_array(spec)), **identity}
    entry["added"] = now()
    if h.version >= 2:
        entry["storage"] = spec.to_dict()
    elif spec.sparse:
        raise CacheError(
            f"a format {h.version} cache stores dense members only; write {spec.text} members "
            "into a new cache (cache-logits --store ... --out NEW)"
        )
    h = h.with_member(entry)
    # overwrite: arrays at this index that the header does not list are leftovers of an add killed
    # midway.
    for name, shape, dtype, chunks in member_row_arrays(h, index):
        group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            compressors=logit_codecs(),
            fill_value=0,
            overwrite=True,
        )
    if h.version >= 2:
        temps, fields = len(spec.temperatures), len(FIDELITY_FIELDS)
        group.create_array(
            member_fidelity(index),
            shape=(h.n_shards, temps, fields),
            dtype="float64",
            chunks=(1, temps, fields),
            compressors=[zc.Crc32cCodec()],
            fill_value=0,
            overwrite=True,
        )
    # One chunk per flag: writers of different shards never share an object.
    group.create_array(
        member_done(index),
        shape=(h.n_shards,),
        dtype="uint8",
        chunks=(1,),
        compressors=[zc.Crc32cCodec()],
        fill_value=0,
        overwrite=True,
    )
    set_header(group, h)
    return h.members[-1]


def _first_array(spec: StorageSpec) -> str:
    return spec.impl.arrays(spec, 2, "float16")[0][0]
