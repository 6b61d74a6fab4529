"""Tiny seeded datasets made in code: image classification tasks saved as npz, a text corpus."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def make_image_task(
    n: int, seed: int, classes: int = 5, side: int = 8, noise: float = 0.9
) -> tuple:
    """A seeded image classification task with planted class prototypes.

    Returns:
        x (n, 1, side, side) float32 and y (n,) int64. Class c's images are prototype c plus
        Gaussian noise, so a small MLP learns it, imperfectly (noise keeps soft targets
        informative).
    """
    protos = (
        np.random.default_rng(1234).normal(0, 1, size=(classes, 1, side, side)).astype(np.float32)
    )
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = protos[y] + rng.normal(0, noise, size=(n, 1, side, side)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def write_npz(
    path: Path,
    n_train: int = 600,
    n_test: int = 300,
    classes: int = 5,
    labeled: bool = True,
    seed: int = 0,
) -> Path:
    """``make_image_task`` saved for the ``npz:PATH:train|test`` source: x_train (n_train, 1, 8,
    8), x_test, y_test, num_classes and (when ``labeled``) y_train."""
    x_tr, y_tr = make_image_task(n_train, seed, classes)
    x_te, y_te = make_image_task(n_test, seed + 1, classes)
    arrays = {"x_train": x_tr, "x_test": x_te, "y_test": y_te, "num_classes": np.int64(classes)}
    if labeled:
        arrays["y_train"] = y_tr
    np.savez(path, **arrays)
    return path


WORDS = [
    "the",
    "lord",
    "said",
    "unto",
    "moses",
    "and",
    "aaron",
    "speak",
    "children",
    "of",
    "israel",
    "land",
    "water",
    "light",
    "day",
]


def make_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    """A seeded English-like corpus (one 'verse' per line), a few tens of KB."""
    rng = np.random.default_rng(seed)
    text = "".join(
        f"{i} " + " ".join(rng.choice(WORDS, size=rng.integers(6, 14))) + ".\n"
        for i in range(lines)
    )
    path.write_text(text, encoding="utf-8")
    return path


def idx_bytes(arr: np.ndarray, magic_type: int = 0x08) -> bytes:
    """An IDX file: magic (0, 0, type, ndim), big-endian dims, then the uint8 data."""
    header = bytes([0, 0, magic_type, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write_idx(
    directory: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool
) -> Path:
    """The MNIST-style IDX pair of ``split`` (images (N, H, W) uint8, labels (N,)) under
    ``directory``, with the file names ``pipeline.data.idx.IDX_FILES`` gives, gzipped or not."""
    from pipeline.data.idx import IDX_FILES

    directory.mkdir(parents=True, exist_ok=True)
    img_name, lab_name = IDX_FILES[split]
    for name, arr in ((img_name, images), (lab_name, labels)):
        data = idx_bytes(arr)
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return directory
