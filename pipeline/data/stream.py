"""Streaming a lazy dataset into the two stages: loader settings and the content check.

Stage one (:mod:`pipeline.cache.writer`) decodes each shard's rows through the dataset's DataLoader
and stores their digests; stage two calls :func:`watch_content` on the transfer set it reads, so
every row it decodes (streamed shard by shard, or once into memory when it fits the budget) is
checked against the digests the cache holds, and a changed file stops the run naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.lazy import digest_check, is_lazy

if TYPE_CHECKING:
    from pipeline.cache.format import LogitCache
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
