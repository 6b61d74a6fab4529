"""A copy's plan: what it reads, how each object is checked, what it rewrites before writing.

Each chunk is checked by its checksum; the root's metadata is rewritten (without recorded
credentials) before it is written anywhere."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import google_crc32c
from zarr.abc.store import Store
from zarr.core.sync import sync

from pipeline.cache.guard import read_json
from pipeline.cache.header import ATTR_KEY, CacheHeader, expected_arrays
from pipeline.cache.objects import META
from pipeline.errors import CacheError, KDError
from pipeline.redact import redact_record


@dataclass
class CopyPlan:
    """What a copy reads and how each object is checked and (the root) rewritten.

    Attributes:
        root: the root ``zarr.json`` as the destination gets it: the source's, or (a header that
            recorded credentials) rewritten without them.
        checksummed: the arrays whose chunks end in a crc32c, checked before they are written.
    """

    source: Store
    sizes: dict[str, int]
    root: bytes | None
    checksummed: frozenset[str]

    def expected_size(self, key: str) -> int:
        return len(self.root) if key == META and self.root is not None else self.sizes[key]

    def check(self, key: str, data: bytes) -> bytes:
        """The bytes to write for ``key`` (read from the source), once they passed their checks.

        Raises:
            CacheError: a chunk whose checksum does not match (its bytes are not echoed).
        """
        if key == META and self.root is not None:
            return self.root
        array = key.rpartition("/c/")[0] if "/c/" in "/" + key else ""
        if array in self.checksummed and not _crc_ok(data):
            raise CacheError(
                f"the source's chunk {key} fails its checksum (crc32c): the source is damaged, "
                "so the copy stopped before writing it. Check the source with `kd-pipeline "
                "cache verify` and get a good copy of it"
            )
        return data


def _crc_ok(data: bytes) -> bool:
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def checksummed_arrays(source: Store, h: CacheHeader) -> frozenset[str]:
    """The cache's arrays whose codecs end in crc32c (all of them, in every cache kd-pipeline
    wrote), read from their metadata through the read guard."""
    out = set()
    for name, *_ in expected_arrays(h):
        try:
            meta = sync(read_json(source, f"{name}/{META}", name))
        except KDError:
            continue  # damaged metadata: the copy's verification names it
        codecs = meta.get("codecs") if isinstance(meta, dict) else None
        if isinstance(codecs, list) and codecs and _codec_name(codecs[-1]) == "crc32c":
            out.add(name)
    return frozenset(out)


def _codec_name(codec: Any) -> str | None:
    return (
        codec.get("name") if isinstance(codec, dict) else codec if isinstance(codec, str) else None
    )


def redacted_root(root_meta: Any) -> bytes | None:
    """The source's root ``zarr.json`` without recorded credentials, or None when it has none.

    Caches written before headers were redacted may record ``--storage-option secret=...`` in their
    ``command``: a copy or bundle never carries it on.
    """
    attrs = root_meta.get("attributes") if isinstance(root_meta, dict) else None
    header = attrs.get(ATTR_KEY) if isinstance(attrs, dict) else None
    if not isinstance(header, dict):
        return None
    clean = redact_record(header)
    if clean == header:
        return None
    meta = {**root_meta, "attributes": {**attrs, ATTR_KEY: clean}}
    return json.dumps(meta, indent=2).encode()
