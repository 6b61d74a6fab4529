"""What ``cache info`` shows of a cache: :class:`CacheInfo` and how rows are described."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache.header import CacheHeader, MemberRecord
from pipeline.cache.kinds import bytes_per_row


def describe_rows(samples: int, views: int = 1, positions: int = 1) -> str:
    """How many rows a cache holds and what they are, e.g. ``"8000 rows (2000 samples x 4
    views)"``: the row count alone would hide that a view or token cache has several per sample.
    """
    per_sample = views * positions
    if per_sample == 1:
        return f"{samples} rows"
    parts = [f"{samples} {'sequences' if positions > 1 else 'samples'}"]
    if views > 1:
        parts.append(f"{views} views")
    if positions > 1:
        parts.append(f"{positions} token positions")
    return f"{samples * per_sample} rows ({' x '.join(parts)})"


@dataclass
class CacheInfo:
    """What ``cache info`` prints."""

    location: str
    header: CacheHeader
    shards_done: list[int]
    size_on_disk: int
    raw_size: int
    member_bytes: dict[int, int] | None = None  # bytes on disk of each member's arrays

    def to_dict(self) -> dict:
        h = self.header
        dataset = h.dataset.to_dict()
        return {
            "location": self.location,
            "format": h.format,
            "version": h.version,
            "n": h.n,
            "num_classes": h.num_classes,
            "class_names": list(h.class_names),
            "dtype": h.dtype,
            "codecs": None if h.codecs is None else list(h.codecs),
            "rows_per_shard": h.rows_per_shard,
            "n_shards": h.n_shards,
            "shards_done": self.shards_done,
            "complete": h.complete,
            "labeled": h.labeled,
            "rows": h.n_rows,
            "views": h.views,
            "positions": 1 if h.rows is None else int(h.rows["positions"]),
            "augment": None if h.augment is None else h.augment["spec"],
            "include_identity": None if h.augment is None else h.augment.get("include_identity"),
            "members": [self._member(m) for m in h.members],
            "dataset": {
                k: dataset.get(k) for k in ("spec", "fingerprint", "n", "sample_shape", "labeled")
            },
            "size_on_disk": self.size_on_disk,
            "raw_float32_size": self.raw_size,
            "created": h.created,
            "completed_at": h.completed_at,
            "command": h.command,
            "tool_version": h.tool_version,
        }

    def _member(self, m: MemberRecord) -> dict:
        """A member's identity, its storage, bytes per row and what storing lost."""
        h = self.header
        keys = ("index", "model_spec", "checkpoint_sha256", "path", "metrics")
        out = {k: m.to_dict().get(k) for k in keys}
        spec = m.spec
        dense_row = h.num_classes * np.dtype(h.dtype).itemsize
        raw_row = bytes_per_row(spec, h.num_classes, h.dtype)
        out["storage"] = spec.text
        out["temperatures"] = list(spec.temperatures) if spec.sparse else None
        out["raw_bytes_per_row"] = raw_row
        out["dense_bytes_per_row"] = dense_row
        if self.member_bytes is not None and h.n_rows:
            on_disk = self.member_bytes.get(m.index, 0) / h.n_rows
            out["bytes_per_row_on_disk"] = round(on_disk, 2)
            out["ratio_to_dense"] = round(on_disk / dense_row, 5)
        out["fidelity"] = None if spec.fidelity is None else dict(spec.fidelity)
        return out
