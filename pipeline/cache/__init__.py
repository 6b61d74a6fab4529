"""The logit cache: its Zarr format, where it lives, how it is written, verified and shared.

- ``location``: where a cache lives (a directory, a ``.zarr.zip`` bundle or ``s3://``), resolved
  once into a :class:`CacheLocation` that opens its stores, says if it exists and locks it.
- ``kinds``: how one member's rows are stored (``dense``, ``topk:K``, ``sampled:S``): a registry
  of storage kinds, each with its arrays, encoding, checks and fidelity.
- ``header``: the header of format version 2 (it reads version 1 too) as a frozen, typed
  :class:`CacheHeader`.
- ``guard``: what a cache's stored bytes may be (sizes, nesting, codecs, zstd frame sizes) before
  zarr parses or decompresses them; every read-only store is a ``GuardedStore``.
- ``format``: the layout of format version 2, and ``LogitCache``, the reader (no torch needed).
- ``rows``: the row index and views' parameters re-derived from the header: every reader's
  checks.
- ``writer``: stage one, teachers run once over a transfer set into a cache (planned: create,
  resume, add members; then executed).
- ``sharing``: verify, pack, copy and list caches.
- ``transfer``: the transfer set behind a cache: the spec it records, or this machine's copy
  (``--dataset``).
- ``replay``: ``cache verify --replay``: stored rows recomputed from the teacher.
- ``config``: the configs of ``cache-logits`` and the ``cache`` tools, ``--storage-option``.
"""

from pipeline.cache.format import LogitCache, cache_fingerprint, read_header
from pipeline.cache.header import CacheHeader
from pipeline.cache.location import CacheLocation

__all__ = ["CacheHeader", "CacheLocation", "LogitCache", "cache_fingerprint", "read_header"]
