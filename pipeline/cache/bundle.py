"""Packing a cache into a single-file ``.zarr.zip`` bundle, written whole then renamed into place.

The bundle is written once, verified, then renamed into place (a zip cannot be resumed)."""

from __future__ import annotations

import os

from pipeline.cache.copy_plan import CopyPlan
from pipeline.cache.location import ZIP_SUFFIX, CacheLocation
from pipeline.cache.objects import META
from pipeline.cache.store_keys import get_bytes, key_sizes, put_bytes
from pipeline.cache.verify import verify_cache
from pipeline.cache.zipcheck import validate_zip
from pipeline.errors import CacheError
from pipeline.progress import progress_bar


def copy_to_zip(
    plan: CopyPlan, keys: list[str], dst: CacheLocation, progress: bool
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


def _write_zip(plan: CopyPlan, keys: list[str], partial: CacheLocation, progress: bool) -> int:
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
