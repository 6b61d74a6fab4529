"""The transfer set behind a cache: the spec it records, or the user's copy of that data.

A cache records the dataset spec it was made with (``npz:mine.npz:train``, a path on the machine
and in the directory where it was made) and the data's fingerprint. On a teammate's machine the
same data lives elsewhere, so every step that reads a cache's transfer set (``train-student``,
``sweep``, ``specialists``) takes ``--dataset SPEC``: the user's copy, accepted only when its
fingerprint is the cache's. The fingerprint, not the spec, is what makes two datasets the same.
"""

from __future__ import annotations

import numpy as np

from pipeline.cache.read import LogitCache
from pipeline.datasets import Dataset, load_dataset, parse_spec
from pipeline.errors import CacheError, DatasetError


def load_transfer_set(
    cache: LogitCache, dataset: str | None = None, data_dir: str | None = None
) -> Dataset:
    """The cache's transfer set: ``dataset`` (a copy of it) or the spec the cache records.

    Args:
        cache: the opened cache.
        dataset: ``--dataset``: where this machine holds the cache's data; None: the recorded spec.
        data_dir: ``--data-dir``, for specs that need files (``mnist:train``).

    Returns:
        The dataset, checked to be the one the cache was made on (fingerprint and sample ids).

    Raises:
        CacheError: the data is not found (naming the recorded spec and how to repoint it), or it
            is other data than the cache's (naming both fingerprints).
    """
    recorded, want = cache.dataset.spec, cache.dataset.fingerprint
    if not dataset and recorded and recorded.startswith("py:"):
        # A py: spec imports and runs the module it names: the cache's author chose it, so it is
        # run only when the user types it (as a recorded py: model spec needs --trust-code).
        raise CacheError(
            f"{cache.location} records the dataset {recorded}, which would import and run "
            f"Python code; nothing was imported. If you trust it, pass --dataset {recorded}"
        )
    try:
        data = load_dataset(dataset or recorded, data_dir)
    except DatasetError as e:
        if dataset:
            raise CacheError(f"--dataset {dataset}: {e}") from e
        raise CacheError(
            f"{cache.location}: cannot load the transfer set the cache records, {recorded} (the "
            f"spec as given where the cache was made): {e}. If your copy of that data lives "
            f"elsewhere, point the cache at it with --dataset {_repoint_hint(recorded)} (accepted "
            f"when its fingerprint is {want})"
        ) from e
    if data.fingerprint != want:
        if dataset:
            raise CacheError(
                f"--dataset {data.spec} has fingerprint {data.fingerprint}, but the cache "
                f"{cache.location} was made on {recorded} with fingerprint {want}: not the same "
                "data (rows, order and labels must be identical, modifiers included); give the "
                "copy of the data the cache was made on"
            )
        raise CacheError(
            f"the cache was made on {recorded} with fingerprint {want}, but {recorded} now has "
            f"fingerprint {data.fingerprint}: the data changed since, or another file has that "
            "path here. Point the cache at your copy of the original data with --dataset SPEC, "
            "re-create the cache with `kd-pipeline cache-logits`, or restore the original data"
        )
    if not np.array_equal(data.ids, cache.read_ids()):
        raise CacheError(
            f"{cache.location}: the cache's sample ids differ from {data.spec}'s; "
            "the cache is damaged, or the modifiers differ from "
            f"{recorded}'s"
        )
    return data


def _repoint_hint(spec: str) -> str:
    """``npz:mine.npz:train:count=9`` -> ``npz:FILE:train:count=9``: the recorded spec with its
    location parts as placeholders (the split and modifiers must stay as they were)."""
    try:
        source, args, _ = parse_spec(spec)
    except DatasetError:
        return "SPEC"
    parts = spec.split(":")
    for i, name in enumerate(source.args):
        if name != "split":
            parts[1 + i] = name.upper()
    return ":".join(parts)
