"""The cache header (``attributes["kd_cache"]`` of format version 1) as a frozen, typed value.

:class:`CacheHeader` is read with :meth:`CacheHeader.from_dict`, which checks the JSON against the
format schema (:func:`validate_header`, the same checks and messages as always), and written with
:meth:`CacheHeader.to_dict`, which gives back the very JSON the writer has always produced: the same
keys in the same order, keys this version does not know kept verbatim, so a header read and written
again (a member added, the cache marked complete) is byte-identical apart from what changed. Members
and the dataset are frozen records (:class:`MemberRecord`, :class:`DatasetRecord`) of the same kind.
Nested JSON (metrics, modifiers, ...) is held read-only (mappings as ``MappingProxyType``, lists as
tuples) and returned as plain dicts and lists by ``to_dict``.

This module imports without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar

from pipeline.errors import CacheError

FORMAT_NAME = "kd-pipeline-logit-cache"
FORMAT_VERSION = 1
ATTR_KEY = "kd_cache"
MAX_HEADER_BYTES = 1 << 20  # a header bigger than this is not ours: refuse before parsing further


# --------------------------------------------------------------------------------------- validation
def validate_header(h: Any, where: str = "cache") -> dict:
    """Check a header against the format schema; return it, or raise ``CacheError`` listing why."""
    if not isinstance(h, dict):
        raise CacheError(
            f"{where}: no kd-pipeline cache header (attribute {ATTR_KEY!r}); is this "
            "a logit cache made by `kd-pipeline cache-logits`?"
        )
    if len(json.dumps(h)) > MAX_HEADER_BYTES:
        raise CacheError(
            f"{where}: the cache header is over {MAX_HEADER_BYTES} bytes; refusing to use it"
        )
    if h.get("format") != FORMAT_NAME:
        raise CacheError(f"{where}: format is {h.get('format')!r}, expected {FORMAT_NAME!r}")
    if not isinstance(h.get("version"), int) or h["version"] > FORMAT_VERSION:
        raise CacheError(
            f"{where}: cache format version {h.get('version')!r} is not supported by "
            f"this kd-pipeline (understands <= {FORMAT_VERSION}); upgrade kd-pipeline"
        )
    types = {
        "n": int,
        "num_classes": int,
        "rows_per_shard": int,
        "n_shards": int,
        "dtype": str,
        "labeled": bool,
        "dataset": dict,
        "members": list,
        "complete": bool,
        "class_names": list,
    }
    problems = [
        f"{k} should be {t.__name__}, found {type(h.get(k)).__name__}"
        for k, t in types.items()
        if not isinstance(h.get(k), t)
    ]
    if not problems:
        if h["n_shards"] != math.ceil(h["n"] / h["rows_per_shard"]):
            problems.append(
                f"n_shards={h['n_shards']} does not match n={h['n']} / "
                f"rows_per_shard={h['rows_per_shard']}"
            )
        if h["dtype"] not in ("float16", "float32"):
            problems.append(f"dtype {h['dtype']!r} is not float16 or float32")
        for i, m in enumerate(h["members"]):
            if (
                not isinstance(m, dict)
                or m.get("index") != i
                or not isinstance(m.get("checkpoint_sha256"), str)
            ):
                problems.append(f"member {i} entry is malformed")
            elif m.get("num_classes") != h["num_classes"]:
                problems.append(
                    f"member {i} has {m.get('num_classes')} classes, the cache {h['num_classes']}"
                )
        if not isinstance(h["dataset"].get("fingerprint"), str):
            problems.append("dataset.fingerprint is missing")
    if problems:
        raise CacheError(
            f"{where}: the cache header does not match format {FORMAT_NAME} "
            f"v{FORMAT_VERSION}: " + "; ".join(problems)
        )
    return h


# -------------------------------------------------------------------------------------- JSON values
def freeze(value: Any) -> Any:
    """A read-only copy of a JSON value: mappings as ``MappingProxyType``, lists as tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain JSON value of :func:`freeze`'s result (dicts and lists)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


class _Record:
    """Typed fields for the schema's keys; ``extra`` keeps other keys, ``keys`` their order.

    Subclasses are frozen dataclasses whose last two fields are ``extra`` and ``keys``; ``KEYS``
    lists the schema's keys in the order the writer emits them.
    """

    KEYS: ClassVar[tuple[str, ...]] = ()
    extra: Mapping[str, Any]
    keys: tuple[str, ...]

    @classmethod
    def _values(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments for ``d``: known keys frozen (absent: None), the rest in extra."""
        values: dict[str, Any] = {k: freeze(d.get(k)) for k in cls.KEYS}
        values["extra"] = freeze({k: v for k, v in d.items() if k not in cls.KEYS})
        values["keys"] = tuple(d)
        return values

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every key the record was made from (and any set since), in order."""
        return {k: thaw(getattr(self, k) if k in self.KEYS else self.extra[k]) for k in self.keys}

    def _with(self, **changes: Any) -> Any:
        """A copy with ``changes``; keys the record lacked are appended (as a dict update does)."""
        keys = self.keys + tuple(k for k in changes if k not in self.keys)
        return replace(self, keys=keys, **changes)  # type: ignore[type-var]


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class DatasetRecord(_Record):
    """The transfer set a cache was made on (``Dataset.describe()``)."""

    KEYS: ClassVar[tuple[str, ...]] = (
        "spec",
        "fingerprint",
        "n",
        "sample_shape",
        "input_dtype",
        "labeled",
        "num_classes",
        "class_names",
        "input_stats",
        "modifiers",
        "source",
    )

    spec: str | None
    fingerprint: str
    n: int | None
    sample_shape: tuple[int, ...] | None
    input_dtype: str | None
    labeled: bool | None
    num_classes: int | None
    class_names: tuple[str, ...] | None
    input_stats: tuple[float, ...] | None
    modifiers: Mapping[str, Any] | None
    source: Mapping[str, Any] | None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    keys: tuple[str, ...] = KEYS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetRecord:
        """The record of a header's ``dataset`` (already checked by :func:`validate_header`)."""
        return cls(**cls._values(d))


@dataclass(frozen=True)
class MemberRecord(_Record):
    """One teacher of the cache: ``{index, array, path, checkpoint_sha256, ..., added}``."""

    KEYS: ClassVar[tuple[str, ...]] = (
        "index",
        "array",
        "path",
        "checkpoint_sha256",
        "model_spec",
        "num_classes",
        "train_dataset",
        "train_dataset_fingerprint",
        "metrics",
        "added",
    )

    index: int
    array: str | None
    path: str | None
    checkpoint_sha256: str
    model_spec: str | None
    num_classes: int | None
    train_dataset: str | None
    train_dataset_fingerprint: str | None
    metrics: Mapping[str, Any] | None
    added: str | None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    keys: tuple[str, ...] = KEYS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemberRecord:
        """The record of a ``members`` entry (already checked by :func:`validate_header`)."""
        return cls(**cls._values(d))


@dataclass(frozen=True)
class CacheHeader(_Record):
    """A cache's header, format ``kd-pipeline-logit-cache`` v1 (see :mod:`pipeline.cache.format`).

    Read with :meth:`from_dict` (strict); :meth:`to_dict` gives the JSON the writer always wrote.
    """

    KEYS: ClassVar[tuple[str, ...]] = (
        "format",
        "version",
        "n",
        "num_classes",
        "class_names",
        "rows_per_shard",
        "n_shards",
        "dtype",
        "codecs",
        "labeled",
        "dataset",
        "members",
        "tool",
        "tool_version",
        "created",
        "command",
        "complete",
        "completed_at",
    )

    format: str
    version: int
    n: int
    num_classes: int
    class_names: tuple[str, ...]
    rows_per_shard: int
    n_shards: int
    dtype: str
    codecs: tuple[str, ...] | None
    labeled: bool
    dataset: DatasetRecord
    members: tuple[MemberRecord, ...]
    tool: str | None
    tool_version: str | None
    created: str | None
    command: str | None
    complete: bool
    completed_at: str | None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    keys: tuple[str, ...] = KEYS

    @classmethod
    def from_dict(cls, d: Any, where: str = "cache") -> CacheHeader:
        """Check ``d`` against the format schema and build the header.

        Raises:
            CacheError: what :func:`validate_header` finds wrong (its messages, naming ``where``).
        """
        validate_header(d, where)
        values = cls._values(d)
        values["dataset"] = DatasetRecord.from_dict(d["dataset"])
        values["members"] = tuple(MemberRecord.from_dict(m) for m in d["members"])
        return cls(**values)

    @classmethod
    def new(
        cls,
        *,
        n: int,
        num_classes: int,
        class_names: Sequence[str],
        rows_per_shard: int,
        dtype: str,
        codecs: Sequence[str],
        labeled: bool,
        dataset: Mapping[str, Any],
        tool_version: str,
        created: str,
        command: str,
    ) -> CacheHeader:
        """The header of a cache being created: no members yet, not complete."""
        return cls(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            n=n,
            num_classes=num_classes,
            class_names=tuple(class_names),
            rows_per_shard=rows_per_shard,
            n_shards=math.ceil(n / rows_per_shard),
            dtype=dtype,
            codecs=tuple(codecs),
            labeled=labeled,
            dataset=DatasetRecord.from_dict(dataset),
            members=(),
            tool="kd-pipeline",
            tool_version=tool_version,
            created=created,
            command=command,
            complete=False,
            completed_at=None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The header's JSON object, as the writer has always written it."""
        out = super().to_dict()
        if "dataset" in out:
            out["dataset"] = self.dataset.to_dict()
        if "members" in out:
            out["members"] = [m.to_dict() for m in self.members]
        return out

    # -- changes (each returns a new header)
    def with_member(self, entry: Mapping[str, Any]) -> CacheHeader:
        """The header with ``entry`` appended to ``members``, no longer complete."""
        return self._with(
            members=(*self.members, MemberRecord.from_dict(entry)),
            complete=False,
            completed_at=None,
        )

    def completed(self, at: str) -> CacheHeader:
        """The header marked complete at time ``at``."""
        return self._with(complete=True, completed_at=at)

    # -- derived
    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of ``shard``."""
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n)

    def fingerprint(self, members: Sequence[int] | None = None) -> str:
        """Identity of the content: dataset, member checkpoints (in order), dtype and shape.

        Two caches with the same fingerprint serve the same soft targets; runs record it. With
        ``members`` the fingerprint covers just that subset (what a run actually used).
        """
        chosen = self.members if members is None else [self.members[i] for i in members]
        ident = {
            "dataset": self.dataset.fingerprint,
            "members": [m.checkpoint_sha256 for m in chosen],
            "dtype": self.dtype,
            "n": self.n,
            "num_classes": self.num_classes,
        }
        return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
