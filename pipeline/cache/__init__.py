"""The logit cache: its Zarr format, where it lives, how it is written, verified and shared.

- ``location``: where a cache lives (a directory, a ``.zarr.zip`` bundle or ``s3://``), resolved once into a value.
- ``format``: the layout and header of format version 1, and ``LogitCache``, the reader (imports without torch).
- ``writer``: stage one, teachers run once over a transfer set into a cache (create, resume, add members).
- ``sharing``: verify, pack, copy and list caches.
- ``transfer``: the transfer set behind a cache: the spec it records, or this machine's copy
  (``--dataset``).
"""

from pipeline.cache.format import LogitCache, cache_fingerprint, read_header

__all__ = ["LogitCache", "cache_fingerprint", "read_header"]
