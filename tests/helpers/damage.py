"""Damaging a copy of a cache, as a careless script, a bad writer or a broken disk would.

A *damage* is a function of the copy's root directory. Semantic damage edits arrays and the header
with zarr itself (every chunk stays valid, so only the cache's own checks can catch it); byte
damage deletes a stored object or changes its bytes. ``damaged`` applies one to a copy and serves
it as a directory, a ``.zarr.zip`` bundle or on S3.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

Damage = Callable[[Path], None]


def damaged(
    src: Path, tmp: Path, location: str, damage: Damage, name: str = "damaged"
) -> Path | str:
    """A copy of the cache directory ``src`` with ``damage(copy)`` applied, served at ``location``.

    Args:
        src: a cache directory (never changed).
        tmp: where the copy goes (``TMP/NAME.zarr``, and ``TMP/NAME.zarr.zip`` for a bundle).
        location: ``"dir"`` (the copy), ``"zip"`` (a bundle zipped by hand: ``cache pack``
            verifies what it packs, so it refuses damage) or ``"s3"`` (uploaded object by object
            to the test bucket; needs the ``s3_server`` fixture).
        damage: applied to the copy's root.
        name: the copy's name.

    Returns:
        The directory or bundle path, or the ``s3://`` URL.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    copy = tmp / f"{name}.zarr"
    shutil.copytree(src, copy)
    damage(copy)
    if location == "dir":
        return copy
    if location == "s3":
        from tests.helpers.s3 import upload_dir

        return upload_dir(copy, f"damaged/{tmp.name}/{name}.zarr")
    bundle = tmp / f"{name}.zarr.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        for f in sorted(copy.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(copy).as_posix())
    return bundle


def _open(root: Path):  # noqa: ANN202 - a zarr.Group
    import zarr

    return zarr.open_group(str(root), mode="r+", use_consolidated=False)


# ------------------------------------------------------------------------------ semantic damage
def write(path: str, index: tuple | int, value: object) -> Damage:
    """Store ``value`` at ``index`` of array ``path`` as a valid chunk."""

    def apply(root: Path) -> None:
        _open(root)[path].with_config({"write_empty_chunks": True})[index] = value

    return apply


def edit(array: str, change: Callable[[np.ndarray], None]) -> Damage:
    """Rewrite a whole array after ``change`` edits it in place (valid chunks: zarr writes)."""

    def apply(root: Path) -> None:
        arr = _open(root)[array]
        a = arr[...]
        change(a)
        arr.with_config({"write_empty_chunks": True})[...] = a

    return apply


def _set(a: np.ndarray, index: tuple | int, value: object) -> None:
    a[index] = value


def put(array: str, index: tuple | int, value: object) -> Damage:
    """``array[index] = value`` (the whole array rewritten)."""
    return edit(array, lambda a: _set(a, index, value))


def add(array: str, row: int, delta: float) -> Damage:
    """``array[row] += delta``."""
    return edit(array, lambda a: _set(a, row, a[row] + delta))


def header(change: Callable[[dict], None]) -> Damage:
    """The header (``kd_cache`` attribute) after ``change`` edits a deep copy of it in place."""

    def apply(root: Path) -> None:
        g = _open(root)
        h = json.loads(json.dumps(dict(g.attrs["kd_cache"])))
        change(h)
        g.attrs["kd_cache"] = h

    return apply


def edit_header(**changes: object) -> Damage:
    """Change header fields (``num_classes`` also changes every member's)."""

    def apply(root: Path) -> None:
        g = _open(root)
        h = dict(g.attrs["kd_cache"])
        h.update(changes)
        if "num_classes" in changes:
            h["members"] = [{**m, "num_classes": changes["num_classes"]} for m in h["members"]]
        if "rows" in h and "n" in changes:  # format 2's row count follows n: the header stays
            h["rows"] = {**h["rows"], "n": changes["n"]}  # consistent, the arrays disagree
        g.attrs["kd_cache"] = h

    return apply


def relabel(root: Path) -> None:
    """Sample 130's label rewritten to another valid class (of 5)."""
    arr = _open(root)["labels"]
    arr[130] = (int(arr[130]) + 1) % 5


# ---------------------------------------------------------------------------------- byte damage
def remove(key: str) -> Damage:
    """Delete one stored object (a chunk) of the cache."""
    return lambda root: (root / key).unlink()


def flip_first_byte(path: Path) -> None:
    """Flip the lowest bit of a file's first byte (``{`` becomes ``z``: no longer JSON)."""
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))


def rle_frame(blocks: int, content_size: int | None) -> bytes:
    """A zstd frame of ``blocks`` RLE blocks of 128 KiB zeros, declaring ``content_size`` (8-byte
    field) or no size at all: a few bytes that decode to ``blocks`` x 128 KiB."""
    magic = (0xFD2FB528).to_bytes(4, "little")
    # Frame header: no size and a window descriptor (2 MiB), or an 8-byte size field.
    head = (
        bytes([0x00, 0x58])
        if content_size is None
        else bytes([0xC0, 0x58]) + content_size.to_bytes(8, "little")
    )
    body = b"".join(
        ((i == blocks - 1) | (1 << 1) | ((1 << 17) << 3)).to_bytes(3, "little") + b"\0"
        for i in range(blocks)
    )
    return magic + head + body
