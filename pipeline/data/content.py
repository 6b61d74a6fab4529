"""Content digests of lazy datasets, as a cache stores them (numpy only: imported by the cache
format, which imports without torch).

Each decoded sample has a 16-byte blake2b digest (:func:`pipeline.data.lazy.sample_digest`); a
cache made on a lazy dataset stores them in ``input_digests`` (N, 16) uint8, one chunk per shard.
A shard's hash is the sha256 of its digest block, and the dataset's content fingerprint the sha256
over its shard hashes, so it is known once every shard was computed, without another pass.
"""

from __future__ import annotations

import hashlib

import numpy as np

DIGEST_BYTES = 16
DIGESTS_ARRAY = "input_digests"  # the cache array holding them, (N, DIGEST_BYTES) uint8
CONTENT_KEY = "content"  # the dataset record's key saying its content is checked by digests
CONTENT_DIGESTS = "input-digests"


def shard_hashes(digests: np.ndarray, rows_per_shard: int) -> list[str]:
    """sha256 of each shard's (rows, DIGEST_BYTES) digest block, in shard order."""
    return [
        hashlib.sha256(np.ascontiguousarray(digests[s : s + rows_per_shard]).tobytes()).hexdigest()
        for s in range(0, len(digests), rows_per_shard)
    ]


def content_fingerprint(digests: np.ndarray, rows_per_shard: int) -> str:
    """The dataset's content fingerprint: sha256 over its shard hashes (``sha256:<hex>``)."""
    h = hashlib.sha256(f"shards:{rows_per_shard};".encode())
    for s in shard_hashes(digests, rows_per_shard):
        h.update(bytes.fromhex(s))
    return "sha256:" + h.hexdigest()
