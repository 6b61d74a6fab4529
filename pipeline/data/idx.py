"""IDX files (MNIST and Fashion-MNIST's format) read into arrays: the four MNIST-style file names
(:data:`IDX_FILES`, gzipped or not), the shipped Fashion-MNIST's directory, and
:func:`read_idx_split` (decoded once per file and kept in a small memo). The ``fashion-mnist``,
``mnist`` and ``idx`` sources of :mod:`pipeline.datasets` read through it.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


_IDX_IMAGES_MAGIC = 0x00000803


_IDX_LABELS_MAGIC = 0x00000801


def shipped_fashion_mnist_dir(data_dir: str | None) -> Path:
    candidates = []
    if data_dir:
        candidates += [Path(data_dir) / "fashion-mnist", Path(data_dir)]
    if os.environ.get("KD_DATA_DIR"):
        candidates += [Path(os.environ["KD_DATA_DIR"]) / "fashion-mnist"]
    candidates += [
        Path(__file__).resolve().parents[1] / "data" / "fashion-mnist",
        Path.cwd() / "data" / "fashion-mnist",
        Path("/usr/share/datasets/fashion-mnist"),  # Debian's dataset-fashion-mnist
    ]
    for c in candidates:
        if find_idx_file(c, IDX_FILES["train"][0]) is not None:
            return c
    raise DatasetError(
        "the shipped Fashion-MNIST files were not found; looked in:\n"
        + "\n".join(f"  {c}" for c in candidates)
        + "\nExpected the four IDX files (e.g. train-images-idx3-ubyte.gz). "
        "Run from a checkout of kd-pipeline, set KD_DATA_DIR, or "
        "`apt-get install dataset-fashion-mnist`."
    )


def find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = directory / name
        if p.is_file():
            return p
    return None


# Decoded IDX files of this process, by (path, size, mtime): a sweep or a reproduce run trains many
# students on the same files, and gunzipping Fashion-MNIST's 47 MB of images costs ~0.5 s each time.
# The key changes when the file does, and callers get a copy, so nothing they do reaches the memo.
_IDX_MEMO: dict[tuple[str, int, int, int], np.ndarray] = {}


_IDX_MEMO_FILES = 8


def _read_idx(path: Path, expected_magic: int, what: str) -> np.ndarray:
    try:
        st = path.stat()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} IDX file ({e})") from e
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, expected_magic)
    if key not in _IDX_MEMO:
        if len(_IDX_MEMO) >= _IDX_MEMO_FILES:
            _IDX_MEMO.pop(next(iter(_IDX_MEMO)))
        _IDX_MEMO[key] = _decode_idx(path, expected_magic, what)
    return _IDX_MEMO[key].copy()


def _decode_idx(path: Path, expected_magic: int, what: str) -> np.ndarray:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            # One-shot decompression is about twice as fast as gzip.open's chunked reads.
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(
            f"{path}: cannot read {what} IDX file ({e}); the file is damaged or not gzip"
        ) from e
    if len(raw) < 8:
        raise DatasetError(
            f"{path}: {len(raw)} bytes is too short for an IDX header; the file is truncated"
        )
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise DatasetError(
            f"{path}: wrong magic number 0x{magic:08x} for an IDX {what} file, "
            f"expected 0x{expected_magic:08x}; is this the right file?"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"{path}: {len(raw)} bytes is too short for an IDX header of {ndim} dimensions; "
            "the file is truncated"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: header says {dims} ({expected} bytes) but the file has {len(raw)} bytes; "
            "the file is truncated or damaged, fetch it again"
        )
    # Copy: frombuffer over bytes is read-only (and the memo keeps this array; callers get copies of
    # it).
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of an MNIST-style IDX directory.

    Returns:
        images (N, 1, H, W) uint8 and labels (N,) int64.
    """
    if split not in IDX_FILES:
        raise DatasetError(f"unknown split {split!r} for IDX data; expected 'train' or 'test'")
    img_stem, lab_stem = IDX_FILES[split]
    img_path, lab_path = find_idx_file(directory, img_stem), find_idx_file(directory, lab_stem)
    if img_path is None or lab_path is None:
        names = [n for pair in IDX_FILES.values() for n in pair]
        raise DatasetError(
            f"IDX files for split {split!r} not found in {directory}; "
            "expected these four files (gzipped or not):\n"
            + "\n".join(f"  {n}[.gz]" for n in names)
        )
    images = _read_idx(img_path, _IDX_IMAGES_MAGIC, "images")
    labels = _read_idx(lab_path, _IDX_LABELS_MAGIC, "labels")
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(
            f"{img_path}: expected images of 3 dimensions and labels of 1, found {images.shape}"
            f" and {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} "
            "labels; the pair must have the same count"
        )
    return images[:, None, :, :], labels.astype(np.int64)
