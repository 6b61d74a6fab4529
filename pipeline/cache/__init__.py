"""The logit cache: its Zarr format, location, writing, reading, checking and sharing.

The format (version 2; version 1 still reads) is specified in docs/cache-format.md.

- ``location``: where a cache lives (a directory, a ``.zarr.zip`` bundle or ``s3://``), resolved
  once into a :class:`CacheLocation` that opens its stores and says if it exists; ``zipcheck``:
  a bundle's entries checked before zarr reads them; ``store_keys``: key-level reads and writes
  on any store; ``lock``: the writer lock (a lock file, or an object store's lease).
- ``kinds``: how one member's rows are stored (``dense``, ``topk:K``, ``sampled:S``): a registry
  of storage kinds, each with its arrays, encoding, checks, fidelity and training-side maths.
- ``builtin_kinds``: the built-in storage kinds (``dense``, ``topk``, ``sampled``).
- ``kind_maths``: the maths the storage kinds share (log-sum-exp, ``lse_at``, convexity checks).
- ``header``: the header of format version 2 (it reads version 1 too) as a frozen, typed
  :class:`CacheHeader`.
- ``guard``: what a cache's stored bytes may be (sizes, nesting, codecs, zstd frame sizes) before
  zarr parses or decompresses them; every read-only store is a ``GuardedStore``.
- ``layout``: the markers, codecs and shard bounds of the format (specified in
  docs/cache-format.md); ``rows``: the row index and views' parameters re-derived from the header.
- ``create`` (the schema), ``write`` (shards, then their done flags; completion): the writing
  primitives. ``writer``: stage one, teachers run once over a transfer set into a cache (planned
  by ``plan``: create, resume, add members; then executed).
- ``read``: ``LogitCache``, the reader (no torch needed), with ``read_checks`` (what it checks on
  what it serves), ``lookup`` (whether a location holds a cache, and its header) and ``info``
  (what ``cache info`` shows).
- ``verify`` and ``verify_chunks``: ``cache verify``; ``copying`` (with ``copy_plan`` and
  ``bundle``): ``cache copy`` and ``cache pack``; ``listing``: ``cache ls``; ``objects``: which
  stored objects are a cache's own; ``reports``: what verify and copy report.
- ``transfer``: the transfer set behind a cache: the spec it records, or this machine's copy
  (``--dataset``).
- ``replay``: ``cache verify --replay``: stored rows recomputed from the teacher.
- ``config``: the configs of ``cache-logits`` and the ``cache`` tools, ``--storage-option``.
"""

from pipeline.cache.header import CacheHeader
from pipeline.cache.location import CacheLocation
from pipeline.cache.lookup import cache_fingerprint, read_header
from pipeline.cache.read import LogitCache

__all__ = ["CacheHeader", "CacheLocation", "LogitCache", "cache_fingerprint", "read_header"]
