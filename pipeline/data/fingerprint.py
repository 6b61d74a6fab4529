"""A dataset's content fingerprint: a sha256 over its inputs and labels in order (with their shapes
and dtypes), computed in chunks so that it never copies the whole array
(:func:`fingerprint_arrays`; :class:`pipeline.datasets.Dataset` records it).
"""

from __future__ import annotations

import hashlib

import numpy as np

FINGERPRINT_CHUNK = 1 << 22  # bytes hashed per step; keeps memory flat on large inputs


def fingerprint_arrays(x: np.ndarray, y: np.ndarray | None) -> str:
    """sha256 over inputs then labels (shape and dtype included), streamed in chunks.

    Args:
        x: inputs, shape (N, ...).
        y: labels, shape (N,), or None.

    Returns:
        ``"sha256:<hex>"``.
    """
    h = hashlib.sha256()
    for name, arr in (("x", x), ("y", y)):
        if arr is None:
            h.update(f"{name}:none;".encode())
            continue
        arr = np.ascontiguousarray(arr)
        h.update(f"{name}:{arr.dtype.str}:{list(arr.shape)};".encode())
        flat = arr.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, FINGERPRINT_CHUNK):
            h.update(memoryview(flat[start : start + FINGERPRINT_CHUNK]))
    return "sha256:" + h.hexdigest()
