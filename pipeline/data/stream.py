"""Streaming a lazy dataset into the two stages: loader settings and the content check.

Stage one (:mod:`pipeline.cache.writer`) decodes each shard's rows through the dataset's DataLoader
and stores their digests; stage two calls :func:`watch_content` on the transfer set it reads, so
every row it decodes (streamed shard by shard, or once into memory when it fits the budget) is
checked against the digests the cache holds, and a changed file stops the run naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.content import content_fingerprint
from pipeline.data.lazy import digest_check, is_lazy

if TYPE_CHECKING:
    from pipeline.cache.read import LogitCache
    from pipeline.datasets import Dataset


def watch_content(
    data: Dataset | None, cache: LogitCache | None, workers: int, batch_size: int | None = None
) -> None:
    """Set a lazy dataset's loader (``workers`` processes, ``batch_size`` rows a batch) and, with
    ``cache``, check every row it decodes against the cache's input digests. In-memory datasets
    are left as they are.
    """
    if data is None or not is_lazy(data.x):
        return
    data.x.set_loader(workers, batch_size)
    if cache is not None:
        data.x.expect = digest_check(data.x, cache.read_digests, data.ids)


def rehash_content(
    data: Dataset, digests: np.ndarray, shards: np.ndarray, rows_per_shard: int
) -> tuple[list[str], str | None]:
    """Decode the given shards of a lazy dataset again and compare with the stored digests
    (``cache verify --dataset``: the one full pass, asked for).

    Args:
        digests: (N, 16) the cache's input digests.
        shards: the shards computed so far (their digests are written).

    Returns:
        Problems (one per shard with changed inputs, naming the files), and the content
        fingerprint (sha256 over the shard hashes) when every shard was checked.
    """
    problems = []
    n = len(data)
    for s in shards:
        start, stop = int(s) * rows_per_shard, min(n, (int(s) + 1) * rows_per_shard)
        _, now = data.x.read_rows(start, stop)
        bad = np.flatnonzero((now != digests[start:stop]).any(axis=1)) + start
        if bad.size:
            names = ", ".join(data.x.name(int(r)) for r in bad[:5])
            problems.append(
                f"shard {int(s)}: {bad.size} input(s) differ from those the cache was made on: "
                f"{names}{' ...' if bad.size > 5 else ''}"
            )
    complete = len(shards) == -(-n // rows_per_shard)
    return problems, (content_fingerprint(digests, rows_per_shard) if complete else None)
