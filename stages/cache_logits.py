"""``kd-pipeline cache-logits``: stage one, the teachers run once over the transfer set into a Zarr cache."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.cache_writer import CacheResult, build_cache
from pipeline.config import CacheConfig


def run(cfg: CacheConfig, log: Callable[[str], None] = print, progress: bool = True) -> CacheResult:
    """Create, resume or extend the cache described by ``cfg`` (see ``pipeline.cache_writer``)."""
    return build_cache(cfg, log=log, progress=progress)
