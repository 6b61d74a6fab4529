"""The cache header as a frozen, typed value (``attributes["kd_cache"]``, format versions 1, 2).

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

from pipeline.cache.kinds import FIDELITY_FIELDS, STORAGE_KINDS, StorageSpec
from pipeline.data.content import CONTENT_DIGESTS, CONTENT_KEY, DIGEST_BYTES, DIGESTS_ARRAY
from pipeline.errors import CacheError
from pipeline.redact import redact_command

FORMAT_NAME = "kd-pipeline-logit-cache"
FORMAT_VERSION = 2  # what this kd-pipeline writes; it reads every version up to this one
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
        if h["version"] >= 2:
            problems += _v2_problems(h)
    if problems:
        raise CacheError(
            f"{where}: the cache header does not match format {FORMAT_NAME} "
            f"v{FORMAT_VERSION}: " + "; ".join(problems)
        )
    return h


def _v2_problems(h: dict) -> list[str]:
    """Format 2's additions: the row layout and each member's storage kind."""
    problems = []
    rows = h.get("rows")
    keys = ("n", "per_shard", "views", "positions")
    if not isinstance(rows, dict) or not all(
        isinstance(rows.get(k), int) and rows[k] >= 1 for k in keys
    ):
        return [f"rows should be an object of positive integers {', '.join(keys)}, found {rows!r}"]
    per_sample = rows["views"] * rows["positions"]
    if rows["per_shard"] != h["rows_per_shard"] * per_sample:
        problems.append(
            f"rows.per_shard={rows['per_shard']} is not rows_per_shard x views x positions "
            f"({h['rows_per_shard']} x {rows['views']} x {rows['positions']})"
        )
    if rows["n"] != h["n"] * per_sample:
        problems.append(f"rows.n={rows['n']} is not n x views x positions")
    augment = h.get("augment")
    if augment is not None:
        params = augment.get("params") if isinstance(augment, dict) else None
        if (
            not isinstance(augment, dict)
            or not isinstance(augment.get("spec"), str)
            or not isinstance(augment.get("version"), int)
            or not isinstance(params, list)
            or not params
            or not all(isinstance(p, str) for p in params)
        ):
            problems.append(
                "augment should be an object with spec (text), version (integer) and params "
                f"(parameter names), found {augment!r}"
            )
    for i, m in enumerate(h["members"]):
        storage = m.get("storage") if isinstance(m, dict) else None
        if not isinstance(storage, dict) or storage.get("kind") not in STORAGE_KINDS:
            problems.append(
                f"member {i} storage should name one of {', '.join(STORAGE_KINDS)}, found "
                f"{storage!r}"
            )
            continue
        size, temps = storage.get("size"), storage.get("temperatures")
        if STORAGE_KINDS[storage["kind"]].SIZED and not (isinstance(size, int) and size >= 1):
            problems.append(f"member {i} storage {storage['kind']} has no size >= 1")
        if (
            not isinstance(temps, list)
            or not temps
            or not all(
                isinstance(t, int | float) and not isinstance(t, bool) and 0 < t < math.inf
                for t in temps
            )
        ):
            problems.append(f"member {i} storage temperatures should be positive numbers")
            continue
        problems += _storage_problems(i, storage, h["num_classes"])
    if rows["views"] > 1 and augment is None:
        problems.append(
            f"rows.views={rows['views']} but no augment record: a view cache's header says how "
            "its views were drawn"
        )
    return problems


def _storage_problems(i: int, storage: dict, num_classes: int) -> list[str]:
    """A member's storage record beyond its types: what its arrays' meaning depends on.

    The recorded temperatures name the columns of ``tail_lse`` / ``lse``, so two equal ones make
    a column ambiguous; the sampling temperature must be one of them (the importance weights use
    its column); a top-k member keeps at most C classes.
    """
    problems = []
    kind, size, temps = storage["kind"], storage.get("size"), storage["temperatures"]
    ts = storage.get("sample_temperature")
    if len({float(t) for t in temps}) != len(temps):
        problems.append(f"member {i} storage temperatures {temps} repeat a temperature")
    if not STORAGE_KINDS[kind].SIZED and size is not None:
        problems.append(f"member {i} storage {kind} takes no size, found size={size!r}")
    problems += STORAGE_KINDS[kind].record_problems(i, size, temps, ts, num_classes)
    return problems


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
        "storage",
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
    storage: Mapping[str, Any] | None  # format 2: how its rows are stored (format 1: dense)
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    keys: tuple[str, ...] = KEYS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemberRecord:
        """The record of a ``members`` entry (already checked by :func:`validate_header`)."""
        return cls(**cls._values(d))

    @property
    def spec(self) -> StorageSpec:
        """How this member's rows are stored (a format 1 member: dense)."""
        return StorageSpec.from_dict(None if self.storage is None else thaw(self.storage))

    def with_storage(self, storage: Mapping[str, Any]) -> MemberRecord:
        return self._with(storage=freeze(dict(storage)))


@dataclass(frozen=True)
class CacheHeader(_Record):
    """A cache's header, format ``kd-pipeline-logit-cache`` v1 (see docs/cache-format.md).

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
        "rows",
        "seed",
        "augment",
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
    rows: Mapping[str, int] | None  # format 2: {n, per_shard, views, positions}; None in format 1
    seed: int | None  # format 2: seeds sampled storage (with member and shard) and views
    # format 2 view caches: {spec, version, params, transforms, include_identity, draws}; absent
    # (None) in caches without augmented views
    augment: Mapping[str, Any] | None
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
        if isinstance(values.get("command"), str):
            # Caches made before commands were redacted may hold credentials: never passed on.
            values["command"] = redact_command(values["command"])
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
        seed: int = 0,
        views: int = 1,
        positions: int = 1,
        augment: Mapping[str, Any] | None = None,
    ) -> CacheHeader:
        """The header of a (format 2) cache being created: no members yet, not complete.

        Args:
            views: rows per sample for augmented views; augment: how they were drawn (the
                ``augment`` record of :class:`pipeline.augment.ViewPlan`), None without views.
        """
        per_sample = views * positions
        rows = {"n": n * per_sample, "per_shard": rows_per_shard * per_sample}
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
            rows=freeze({**rows, "views": views, "positions": positions}),
            seed=seed,
            augment=None if augment is None else freeze(dict(augment)),
            dataset=DatasetRecord.from_dict(dataset),
            members=(),
            tool="kd-pipeline",
            tool_version=tool_version,
            created=created,
            command=redact_command(command),  # a header is shared: never a credential in it
            complete=False,
            completed_at=None,
            # A cache without views has no augment key: its header is what it always was.
            keys=cls.KEYS if augment is not None else tuple(k for k in cls.KEYS if k != "augment"),
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

    def with_storage(self, member: int, storage: Mapping[str, Any]) -> CacheHeader:
        """The header with member ``member``'s storage record replaced (its fidelity added)."""
        members = list(self.members)
        members[member] = members[member].with_storage(storage)
        return self._with(members=tuple(members))

    # -- derived
    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Sample range [start, stop) of ``shard``."""
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n)

    @property
    def n_rows(self) -> int:
        """Rows of the member arrays: one per (sample, view, position); format 1: one per
        sample."""
        return self.n if self.rows is None else int(self.rows["n"])

    @property
    def views(self) -> int:
        """Views per sample (1 without augmented views)."""
        return 1 if self.rows is None else int(self.rows["views"])

    @property
    def positions(self) -> int:
        """Token positions per sample (1 for image caches)."""
        return 1 if self.rows is None else int(self.rows["positions"])

    @property
    def view_params(self) -> list[str] | None:
        """The parameter schema of a view cache's ``view_params`` columns; None without views."""
        return None if self.augment is None else list(self.augment["params"])

    @property
    def shard_rows(self) -> int:
        """Rows per shard of the member arrays (their chunk length)."""
        return self.rows_per_shard if self.rows is None else int(self.rows["per_shard"])

    def row_bounds(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of the member arrays that ``shard`` writes."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n_rows)

    def storage(self, member: int) -> StorageSpec:
        """How member ``member``'s rows are stored."""
        return self.members[member].spec

    def fingerprint(self, members: Sequence[int] | None = None) -> str:
        """Identity of the content: dataset, member checkpoints (in order), dtype and shape.

        Two caches with the same fingerprint serve the same soft targets; runs record it. With
        ``members`` the fingerprint covers just that subset (what a run actually used).
        """
        chosen = self.members if members is None else [self.members[i] for i in members]
        ident: dict[str, Any] = {
            "dataset": self.dataset.fingerprint,
            "members": [m.checkpoint_sha256 for m in chosen],
            "dtype": self.dtype,
            "n": self.n,
            "num_classes": self.num_classes,
        }
        # Dense rows, one per sample, serve what a format 1 cache serves: the same fingerprint.
        # Sparse members and more rows per sample serve other targets.
        if any(m.spec.sparse for m in chosen):
            ident["storage"] = [m.spec.identity() for m in chosen]
        if self.rows is not None and self.n_rows != self.n:
            ident["rows"] = dict(self.rows)
        if self.augment is not None:  # views of augmented inputs serve other targets
            ident["augment"] = thaw(self.augment)
        return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- arrays
VIEW_PARAMS = "view_params"  # (rows, P) float32: each view's explicit augmentation parameters


def member_array(index: int, name: str = "logits") -> str:
    return f"members/{index}/{name}"


def member_done(index: int) -> str:
    return f"members/{index}/done"


def member_fidelity(index: int) -> str:
    return f"members/{index}/fidelity"


ArraySpec = tuple[str, tuple[int, ...], str, tuple[int, ...]]  # name, shape, dtype, chunks


def member_row_arrays(h: CacheHeader, index: int) -> list[ArraySpec]:
    """Member ``index``'s row arrays (its storage kind's), one chunk per shard."""
    spec = h.storage(index)
    return [
        (member_array(index, name), (h.n_rows, width), dtype, (h.shard_rows, width))
        for name, width, dtype in spec.impl.arrays(spec, h.num_classes, h.dtype)
    ]


def expected_arrays(h: CacheHeader) -> list[ArraySpec]:
    """Every array ``h`` implies, with the shape, dtype and chunks the format gives it."""
    rows = (h.rows_per_shard,)
    out: list[ArraySpec] = [("ids", (h.n,), "int64", rows)]
    if h.labeled:
        out.append(("labels", (h.n,), "int64", rows))
    if h.version >= 2:
        out += [("row_start", (h.n,), "int64", rows), ("row_count", (h.n,), "int32", rows)]
    if h.dataset.extra.get(CONTENT_KEY) == CONTENT_DIGESTS:  # a lazy dataset's input digests
        out.append((DIGESTS_ARRAY, (h.n, DIGEST_BYTES), "uint8", (h.rows_per_shard, DIGEST_BYTES)))
    if h.view_params is not None:
        width = len(h.view_params)
        out.append((VIEW_PARAMS, (h.n_rows, width), "float32", (h.shard_rows, width)))
    for m in h.members:
        out += member_row_arrays(h, m.index)
        out.append((member_done(m.index), (h.n_shards,), "uint8", (1,)))
        if h.version >= 2:
            temps = len(h.storage(m.index).temperatures)
            fields = len(FIDELITY_FIELDS)
            out.append(
                (
                    member_fidelity(m.index),
                    (h.n_shards, temps, fields),
                    "float64",
                    (1, temps, fields),
                )
            )
    return out
