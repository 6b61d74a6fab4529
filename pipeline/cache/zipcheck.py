"""Checking a ``.zarr.zip`` bundle's entries before zarr sees them (:func:`validate_zip`).

No absolute names, no ``..``, no symlinks, no encrypted or duplicate entries, sane sizes.

This module imports without torch.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from pipeline.errors import CacheError

MAX_ZIP_ENTRIES = 2_000_000
MAX_ZIP_ENTRY_BYTES = 4 << 30  # a logit chunk is one shard of one member: far below this
MAX_ZIP_TOTAL_BYTES = 1 << 40


# --------------------------------------------------------------------------------------------- zips
def validate_zip(path: str | Path) -> None:
    """Refuse a zip whose entries could escape or exhaust: absolute names, ``..``, symlinks, sizes.

    Raises:
        CacheError: what was found and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CacheError(
            f"{path}: no such cache bundle; make one with `kd-pipeline cache pack CACHE {path}`"
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CacheError(
            f"{path}: not a readable zip file ({e}); expected a bundle made by "
            "`kd-pipeline cache pack`. Get a good copy"
        ) from None
    with zf:
        infos = zf.infolist()
        problems = []
        if len(infos) > MAX_ZIP_ENTRIES:
            problems.append(f"{len(infos)} entries (limit {MAX_ZIP_ENTRIES})")
        names: set[str] = set()
        total = 0
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
                problems.append(f"entry {name!r} has an absolute path")
            elif ".." in parts:
                problems.append(f"entry {name!r} contains '..'")
            if stat.S_ISLNK(info.external_attr >> 16):
                problems.append(f"entry {name!r} is a symlink")
            if info.flag_bits & 0x1:
                problems.append(f"entry {name!r} is encrypted")
            if info.file_size > MAX_ZIP_ENTRY_BYTES:
                problems.append(
                    f"entry {name!r} is {info.file_size} bytes (limit {MAX_ZIP_ENTRY_BYTES})"
                )
            if name in names:
                problems.append(f"entry {name!r} appears twice")
            names.add(name)
            total += info.file_size
        if total > MAX_ZIP_TOTAL_BYTES:
            problems.append(f"{total} bytes uncompressed in all (limit {MAX_ZIP_TOTAL_BYTES})")
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; ... ({len(problems)} problems in all)" if len(problems) > 10 else ""
        )
        raise CacheError(
            f"{path}: refusing this bundle: {shown}. A cache bundle holds only "
            "relative Zarr keys (zarr.json, ids/c/0, members/0/logits/c/0/0, ...). Do "
            "not use it; ask its sender for a bundle made by `kd-pipeline cache pack`"
        )
