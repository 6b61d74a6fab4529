"""How one member's rows are stored in cache format 2: ``dense``, ``topk:K`` or ``sampled:S``.

A storage kind turns a block of raw logits (rows, C) into the arrays it stores, checks stored
arrays (``cache verify``), measures what it loses (fidelity, recorded at write time, when the
full logits are still in hand) and says how many bytes a row costs. The kinds are a registry
(:data:`STORAGE_KINDS`, a :class:`pipeline.registry.Registry`): a new kind is one entry. This
module imports without torch.

The kinds (``v`` a row's raw logits, ``T`` a temperature,
``lse_T(S) = log sum_{i in S} exp(v_i/T)``):

- ``dense``: ``logits`` (rows, C), the raw logits in the cache's dtype (as in format 1).
- ``topk:K``: ``values`` (rows, K), the K largest raw logits, sorted descending, in the cache's
  dtype; ``indices`` (rows, K), their classes, in the smallest unsigned integer type that holds C;
  ``tail_lse`` (rows, n_T) float32, ``lse_T`` over the classes *not* kept, at each recorded
  temperature (``-inf`` when K = C). The whole row's log-sum-exp is
  ``logaddexp(lse_T(kept), tail_lse)``, so at a recorded T the kept probabilities and the tail
  mass are exact: stage two trains on the exact (K+1)-bucket distribution (top K + one tail
  bucket), not a renormalised truncation. (The tail is stored rather than the whole row's
  log-sum-exp because a tail of mass 1e-6 would be lost to cancellation in
  ``exp(lse) - sum(kept)``.) At another T the tail is interpolated (:func:`lse_at`).
- ``sampled:S``: ``indices`` (rows, S), S classes drawn with replacement from the teacher's
  distribution at the sampling temperature Ts, sorted; ``values`` (rows, S), their raw logits;
  ``lse`` (rows, n_T) float32, the whole row's ``lse_T`` at each recorded temperature (Ts among
  them). A draw i carries the importance weight ``(1/S) p_T(i) / p_Ts(i)``, and
  ``sum_s w_s (log p_T(i_s) - log q_T(i_s))`` is an unbiased estimate of ``KL(p_T || q_T)`` and of
  its gradient in the student's logits (Anshumann et al., ACL 2025): exact weights at a recorded
  T, interpolated ones elsewhere. Draws are seeded by (cache seed, member, shard), so a resumed or
  distributed write draws the same classes.

Fidelity (per member, per recorded temperature, on :data:`FIDELITY_ROWS` seeded rows per shard):
``KL(full || stored)`` with the tail spread evenly over its classes (mean, worst), the teacher's
probability mass on the kept (or drawn) classes (mean, least), and the total variation distance
between the full and the stored distributions (mean, worst). A sampled row's support is not the
whole row, so its KL is infinite and recorded as null; its loss is unbiased instead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from pipeline.registry import Registry, unknown_name

TAIL_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
FIDELITY_ROWS = 64  # rows per shard whose fidelity is measured at write time
# Per (shard, temperature): rows measured, then sums and extremes of three measures.
FIDELITY_FIELDS = ("rows", "kl_sum", "kl_max", "kept_sum", "kept_min", "tv_sum", "tv_max")
AUTO_DENSE_MAX_CLASSES = 2048  # dense costs 2 C bytes per row in float16: 4 KB at this C
AUTO_TOPK = 64
ENCODE_BLOCK_ELEMENTS = 1 << 22  # float64 elements per encoding block (32 MiB)


def index_dtype(num_classes: int) -> str:
    """The smallest unsigned integer type that holds class indices ``0..num_classes-1``."""
    for name in ("uint8", "uint16", "uint32"):
        if num_classes - 1 <= np.iinfo(name).max:
            return name
    return "uint64"


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log(sum(exp(x)))`` along ``axis``, stable; ``-inf`` for an all ``-inf`` slice."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis=axis)


def lse_at(
    lse: np.ndarray,
    temperatures: Sequence[float],
    temperature: float,
    count: int | np.ndarray,
    ceiling: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """A log-sum-exp recorded at ``temperatures``, at another ``temperature``.

    ``f(b) = log sum_i exp(b v_i)`` is convex in ``b = 1/T`` with ``f(0) = log(count)`` (every
    term is 1 at infinite temperature), and asymptotically linear for large ``b``. The value at
    ``temperature`` is exact when it was recorded; otherwise linear in ``b`` between the recorded
    neighbours (with ``(0, log count)`` as the neighbour above the highest recorded T), or
    extrapolated along the last segment below the lowest recorded T, and capped by ``ceiling``.

    Args:
        lse: (rows, n_T) recorded values. temperatures: the n_T recorded temperatures.
        count: how many classes the sum runs over (scalar or (rows,)).
        ceiling: (rows,) an upper bound at ``temperature`` (for a top-k tail:
            ``v_K / T + log(C - K)``), or None.

    Returns:
        (rows,) float64 values and whether they are exact (recorded) rather than interpolated.
    """
    temps = np.asarray(temperatures, dtype=np.float64)
    hit = np.flatnonzero(np.isclose(temps, temperature, rtol=1e-9, atol=0.0))
    lse = np.asarray(lse, dtype=np.float64)
    if hit.size:
        return lse[:, hit[0]], True
    with np.errstate(divide="ignore"):
        zero = np.broadcast_to(np.log(np.asarray(count, dtype=np.float64)), lse.shape[:1])
    order = np.argsort(1.0 / temps)
    b = np.concatenate([[0.0], 1.0 / temps[order]])
    f = np.concatenate([zero[:, None], lse[:, order]], axis=1)
    target = 1.0 / temperature
    j = int(np.clip(np.searchsorted(b, target), 1, len(b) - 1))  # segment (b[j-1], b[j])
    with np.errstate(invalid="ignore"):  # -inf tails (K = C) stay -inf
        w = (target - b[j - 1]) / (b[j] - b[j - 1])
        out = f[:, j - 1] + w * (f[:, j] - f[:, j - 1])
        out = np.where(np.isneginf(f[:, j]), -np.inf, out)
    if ceiling is not None:
        out = np.minimum(out, ceiling)
    return out, False


#: Storage kind names -> their classes; plug-ins from the entry point group
#: ``kd_pipeline.storage_kinds``. A kind's name is its ``SYNTAX`` up to the ``:``.
STORAGE_KINDS: Registry[type[StorageKind]] = Registry("storage_kinds", "storage kind", ValueError)


@dataclass(frozen=True)
class StorageSpec:
    """How a member's rows are stored: the kind, its size (K or S) and its temperatures.

    Recorded in the member's header entry (``storage``) as :meth:`to_dict` gives it.

    Attributes:
        kind: a name in :data:`STORAGE_KINDS`.
        size: K for ``topk``, S for ``sampled``; None for ``dense``.
        temperatures: the recorded temperatures (tail or row log-sum-exp, fidelity).
        sample_temperature: Ts for ``sampled`` (one of ``temperatures``); None otherwise.
    """

    kind: str
    size: int | None = None
    temperatures: tuple[float, ...] = TAIL_TEMPERATURES
    sample_temperature: float | None = None
    fidelity: Mapping[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def parse(
        cls,
        text: str,
        num_classes: int,
        temperatures: Sequence[float] = TAIL_TEMPERATURES,
        sample_temperature: float = 1.0,
    ) -> StorageSpec:
        """``dense``, ``topk:K``, ``sampled:S`` or ``auto`` (dense up to
        :data:`AUTO_DENSE_MAX_CLASSES` classes, else ``topk:64``) for a teacher of ``num_classes``.

        Raises:
            ValueError: an unknown kind or a bad size, saying what is expected.
        """
        text = str(text).strip()
        if text == "auto":
            text = "dense" if num_classes <= AUTO_DENSE_MAX_CLASSES else f"topk:{AUTO_TOPK}"
        name, _, size = text.partition(":")
        if name not in STORAGE_KINDS:
            raise ValueError(
                unknown_name("storage kind", name, store_choices(), f" in storage {text!r}")
            )
        kind = STORAGE_KINDS[name]
        if not kind.SIZED:
            if size:
                raise ValueError(f"storage {text!r}: {name} takes no size")
            return cls(name, None, tuple(sorted({float(t) for t in temperatures})))
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"storage {text!r}: expected {kind.SYNTAX} with an integer") from None
        if n < 1:
            raise ValueError(f"storage {text!r}: the size must be >= 1")
        # Sorted and distinct: each names one column of tail_lse / lse.
        temps = tuple(sorted({float(t) for t in temperatures}))
        return cls(name, *kind.sized(n, temps, num_classes, float(sample_temperature)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> StorageSpec:
        """The spec a header records (format 1 members, which record none, are dense)."""
        if not d:
            return cls("dense", None, TAIL_TEMPERATURES)
        return cls(
            str(d["kind"]),
            None if d.get("size") is None else int(d["size"]),
            tuple(float(t) for t in d.get("temperatures") or TAIL_TEMPERATURES),
            None if d.get("sample_temperature") is None else float(d["sample_temperature"]),
            d.get("fidelity"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "size": self.size,
            "temperatures": list(self.temperatures),
        }
        if self.sample_temperature is not None:
            out["sample_temperature"] = self.sample_temperature
        if self.fidelity is not None:
            out["fidelity"] = dict(self.fidelity)
        return out

    @property
    def text(self) -> str:
        """``dense``, ``topk:20``, ``sampled:12``: as ``--store`` takes it."""
        return self.kind if self.size is None else f"{self.kind}:{self.size}"

    @property
    def impl(self) -> StorageKind:
        return STORAGE_KINDS[self.kind]

    @property
    def sparse(self) -> bool:
        """Whether the rows hold fewer than all C classes (stage two trains on sparse targets)."""
        return self.impl.SPARSE

    def identity(self) -> dict[str, Any]:
        """What makes two members' stored rows the same (fingerprints): not the fidelity."""
        d = self.to_dict()
        d.pop("fidelity", None)
        return d


class StorageKind:
    """A storage kind: arrays, encoding, checks, fidelity and bytes per row of one member."""

    SYNTAX: ClassVar[str] = ""
    SIZED: ClassVar[bool] = False
    SPARSE: ClassVar[bool] = True
    #: A sparse kind's rows are importance-weighted draws (an unbiased estimate of the KL),
    #: rather than exact kept probabilities plus one tail bucket.
    WEIGHTED: ClassVar[bool] = False
    #: The stored classes are the row's largest logits (``cache verify --replay`` checks it).
    KEEPS_TOP: ClassVar[bool] = False
    #: What stage two's KL matches on this kind's rows (recorded with a run).
    MATCHES: ClassVar[str] = ""
    #: What is interpolated at a temperature the kind did not record ("the ... interpolated").
    INTERPOLATED: ClassVar[str] = ""

    @staticmethod
    def soft_targets(
        spec: StorageSpec,
        arrays: Mapping[str, np.ndarray],
        values: np.ndarray,
        num_classes: int,
        t: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """A sparse member's soft targets at temperature ``t`` from its stored arrays.

        Args:
            values: (rows, n) the stored ``values`` as float64.

        Returns:
            ``logp`` (rows, n) the stored classes' log-probabilities at ``t``; ``rest`` (rows,)
            the log-mass outside them (``-inf`` when none); ``weight`` (rows, n) each stored
            entry's weight in the KL; whether ``t`` was recorded (else interpolated).
        """
        raise NotImplementedError("dense rows are soft targets as they are")

    @staticmethod
    def derived(
        spec: StorageSpec, logits: np.ndarray, indices: np.ndarray, stored: Mapping[str, np.ndarray]
    ) -> tuple[str, np.ndarray, np.ndarray] | None:
        """What a sparse row derives from its full logits, for ``cache verify --replay``.

        Args:
            logits: (C,) float64 the row's full logits, recomputed by the teacher.
            indices: (n,) the stored classes. stored: the row's stored arrays.

        Returns:
            The derived array's name, its values recomputed from ``logits`` and as stored (one
            per recorded temperature); None when the row derives nothing.
        """
        return None

    @staticmethod
    def sized(
        size: int, temperatures: tuple[float, ...], num_classes: int, sample_temperature: float
    ) -> tuple[int, tuple[float, ...], float | None]:
        """A sized kind's (size, temperatures, sample temperature) for ``--store NAME:SIZE``
        over ``num_classes`` classes, from the sorted distinct ``temperatures`` asked for."""
        return size, temperatures, None

    @classmethod
    def record_problems(
        cls, i: int, size: object, temperatures: list, sample_temperature: object, num_classes: int
    ) -> list[str]:
        """What is wrong with member ``i``'s header record of this kind beyond its types (the
        size and temperatures are checked for every kind by the header)."""
        if sample_temperature is not None:
            name = cls.SYNTAX.partition(":")[0]
            return [
                f"member {i} storage {name} records a sample_temperature ({sample_temperature!r})"
            ]
        return []

    @staticmethod
    def arrays(spec: StorageSpec, num_classes: int, dtype: str) -> list[tuple[str, int, str]]:
        """(name, width, dtype) of each row array (shape (n_rows, width)), in write order."""
        raise NotImplementedError

    @staticmethod
    def encode(
        spec: StorageSpec, logits: np.ndarray, dtype: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """(rows, C) float32 raw logits -> the arrays, by name."""
        raise NotImplementedError

    @staticmethod
    def stored_probs(
        spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int, t: float
    ) -> np.ndarray:
        """(rows, C) the distribution at recorded temperature ``t`` that the arrays stand for."""
        raise NotImplementedError

    @classmethod
    def stored_dist(
        cls, spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int, t: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`stored_probs` and its log (zero probabilities' logs clipped to log(1e-300))."""
        q = cls.stored_probs(spec, arrays, num_classes, t)
        return q, np.log(np.maximum(q, 1e-300))

    @staticmethod
    def check(spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int) -> list[str]:
        """What is wrong with stored arrays (a shard's or a whole member's); empty when sound."""
        raise NotImplementedError


def _finite_rows(name: str, a: np.ndarray) -> list[str]:
    bad = np.flatnonzero(~np.isfinite(a.astype(np.float32)).all(axis=1))
    return [f"{name} holds NaN/inf in rows {bad[:10].tolist()}"] if bad.size else []


def as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values.astype(dtype)``; float32 to float16 through torch when the process has it.

    Both round to nearest even (bit-identical results, including subnormals and overflow to
    inf), but numpy converts float32 to float16 element by element in software, about ten times
    slower than torch's vectorised conversion: for a 1000-class shard that was most of what
    storing it cost besides compression. This module itself stays importable without torch.
    """
    torch = sys.modules.get("torch")
    if (
        torch is None
        or dtype != "float16"
        or values.dtype != np.float32
        or values.ndim == 0
        or not values.flags.writeable  # torch.from_numpy warns on a read-only array
    ):
        return values.astype(dtype)
    return torch.from_numpy(np.ascontiguousarray(values)).to(torch.float16).numpy()


def _softmax(v: np.ndarray, t: float) -> np.ndarray:
    z = v.astype(np.float64) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _softmax_and_log(v: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, C) float64 ``softmax(v / t)`` and its log, from one ``exp`` pass (the log is the
    shifted logits minus the log of the row sums, no ``log`` over every value)."""
    z = np.asarray(v, dtype=np.float64) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1, keepdims=True)
    return e / total, z - np.log(total)


@STORAGE_KINDS.register("dense", "dense: every logit, in the cache's dtype")
class Dense(StorageKind):
    SYNTAX = "dense"
    SPARSE = False

    @staticmethod
    def arrays(spec: StorageSpec, num_classes: int, dtype: str) -> list[tuple[str, int, str]]:
        return [("logits", num_classes, dtype)]

    @staticmethod
    def encode(
        spec: StorageSpec, logits: np.ndarray, dtype: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        return {"logits": as_dtype(logits, dtype)}

    @staticmethod
    def stored_probs(
        spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int, t: float
    ) -> np.ndarray:
        return _softmax(arrays["logits"], t)

    @classmethod
    def stored_dist(
        cls, spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int, t: float
    ) -> tuple[np.ndarray, np.ndarray]:
        return _softmax_and_log(arrays["logits"], t)

    @staticmethod
    def check(spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int) -> list[str]:
        return _finite_rows("logits", arrays["logits"])


@STORAGE_KINDS.register("topk", "topk:K the K largest logits and the tail's log-sum-exp")
class TopK(StorageKind):
    SYNTAX = "topk:K"
    SIZED = True
    KEEPS_TOP = True
    MATCHES = "the (K+1)-bucket distribution: top K classes + one tail bucket"
    INTERPOLATED = "tail mass is"

    @staticmethod
    def derived(
        spec: StorageSpec, logits: np.ndarray, indices: np.ndarray, stored: Mapping[str, np.ndarray]
    ) -> tuple[str, np.ndarray, np.ndarray] | None:
        rest = np.delete(logits, indices)
        if not rest.size:
            return None
        want = np.array([logsumexp(rest / t) for t in spec.temperatures])
        return "tail_lse", want, stored["tail_lse"].astype(np.float64)

    @staticmethod
    def soft_targets(
        spec: StorageSpec,
        arrays: Mapping[str, np.ndarray],
        values: np.ndarray,
        num_classes: int,
        t: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        tail_n = num_classes - values.shape[1]
        ceiling = values[:, -1] / t + math.log(tail_n) if tail_n else None
        tail, hit = lse_at(arrays["tail_lse"], spec.temperatures, t, tail_n, ceiling)
        kept = values / t
        total = np.logaddexp(logsumexp(kept, axis=1), tail)
        return kept - total[:, None], tail - total, np.ones_like(values), hit

    @staticmethod
    def sized(
        size: int, temperatures: tuple[float, ...], num_classes: int, sample_temperature: float
    ) -> tuple[int, tuple[float, ...], float | None]:
        return min(size, num_classes), temperatures, None  # K = C keeps every class

    @classmethod
    def record_problems(
        cls, i: int, size: object, temperatures: list, sample_temperature: object, num_classes: int
    ) -> list[str]:
        problems = []
        if isinstance(size, int) and size > num_classes:
            problems.append(
                f"member {i} storage topk:{size} keeps more than the {num_classes} classes"
            )
        return problems + super().record_problems(
            i, size, temperatures, sample_temperature, num_classes
        )

    @staticmethod
    def arrays(spec: StorageSpec, num_classes: int, dtype: str) -> list[tuple[str, int, str]]:
        k = int(spec.size or 1)
        return [
            ("values", k, dtype),
            ("indices", k, index_dtype(num_classes)),
            ("tail_lse", len(spec.temperatures), "float32"),
        ]

    @staticmethod
    def encode(
        spec: StorageSpec, logits: np.ndarray, dtype: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        rows, c = logits.shape
        k = min(int(spec.size or 1), c)
        values = np.empty((rows, k), dtype=dtype)
        indices = np.empty((rows, k), dtype=index_dtype(c))
        tail = np.empty((rows, len(spec.temperatures)), dtype=np.float32)
        step = max(1, ENCODE_BLOCK_ELEMENTS // c)
        for a in range(0, rows, step):  # row blocks: float64 temporaries stay a few MiB
            v = logits[a : a + step].astype(np.float64)
            # argpartition then a stable sort of the K: the order is deterministic (ties by index)
            idx = np.sort(np.argpartition(-v, k - 1, axis=1)[:, :k], axis=1)
            kept = np.take_along_axis(v, idx, axis=1)
            order = np.argsort(-kept, axis=1, kind="stable")
            idx = np.take_along_axis(idx, order, axis=1)
            values[a : a + step] = np.take_along_axis(v, idx, axis=1)
            indices[a : a + step] = idx
            rest = v.copy()
            np.put_along_axis(rest, idx, -np.inf, axis=1)
            for j, t in enumerate(spec.temperatures):
                tail[a : a + step, j] = logsumexp(rest / t, axis=1)
        return {"values": values, "indices": indices, "tail_lse": tail}

    @staticmethod
    def stored_probs(
        spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int, t: float
    ) -> np.ndarray:
        j = _temperature_index(spec, t)
        kept = arrays["values"].astype(np.float64) / t
        tail = arrays["tail_lse"][:, j].astype(np.float64)
        total = np.logaddexp(logsumexp(kept, axis=1), tail)
        k = kept.shape[1]
        rest = num_classes - k
        out = np.zeros((kept.shape[0], num_classes))
        if rest:
            out[:] = (np.exp(tail - total) / rest)[:, None]  # the tail spread evenly
        np.put_along_axis(out, arrays["indices"].astype(np.int64), np.exp(kept - total[:, None]), 1)
        return out

    @staticmethod
    def check(spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int) -> list[str]:
        values, idx, tail = arrays["values"], arrays["indices"], arrays["tail_lse"]
        problems = _finite_rows("values", values) + _index_problems(idx, num_classes)
        dup = np.flatnonzero((np.diff(np.sort(idx.astype(np.int64), axis=1), axis=1) == 0).any(1))
        if dup.size:
            problems.append(f"indices repeat a class within rows {dup[:10].tolist()}")
        v = values.astype(np.float32)
        unsorted = np.flatnonzero((np.diff(v, axis=1) > 0).any(axis=1))
        if unsorted.size:
            problems.append(f"values are not sorted descending in rows {unsorted[:10].tolist()}")
        k = values.shape[1]
        if np.isnan(tail).any() or (k < num_classes and np.isinf(tail).any()):
            # With every class kept (K = C) the tail is empty and -inf in every row: only NaN is
            # wrong there, and only its rows are named.
            wrong = np.isnan(tail) if k == num_classes else ~np.isfinite(tail)
            bad = np.flatnonzero(wrong.any(axis=1))
            problems.append(f"tail_lse holds NaN/inf in rows {bad[:10].tolist()}")
        elif k < num_classes and not problems:
            # Every tail class is <= the smallest kept value, so at each T the tail's
            # log-sum-exp is <= v_K / T + log(C - K) (plus the storage dtype's rounding of v_K).
            t = np.asarray(spec.temperatures, dtype=np.float64)
            vk = v[:, -1].astype(np.float64)[:, None]
            slack = (np.abs(vk) * 2.0**-10 + 1e-3) / t
            over = np.flatnonzero((tail > vk / t + math.log(num_classes - k) + slack).any(1))
            if over.size:
                problems.append(
                    "tail_lse is larger than the kept values allow (a tail class would "
                    f"outrank a kept one) in rows {over[:10].tolist()}"
                )
            else:
                # Every tail class's logit is <= v_K, so the tail's lse_T is a convex function
                # of 1/T whose slope (the tail's mean logit under its own softmax) is <= v_K.
                bad = lse_curve_rows(tail, spec.temperatures, num_classes - k, vk[:, 0])
                if bad.size:
                    problems.append(
                        "tail_lse is not the log-sum-exp of one set of logits at the recorded "
                        "temperatures (not convex in 1/T, or rising faster than the kept "
                        "values allow; temperatures reordered or values edited) in rows "
                        f"{bad[:10].tolist()}"
                    )
        return problems


@STORAGE_KINDS.register("sampled", "sampled:S S classes drawn from the teacher, with their logits")
class Sampled(StorageKind):
    SYNTAX = "sampled:S"
    SIZED = True
    WEIGHTED = True
    MATCHES = "an unbiased importance-sampled estimate of the full KL"
    INTERPOLATED = "importance weights are"

    @staticmethod
    def derived(
        spec: StorageSpec, logits: np.ndarray, indices: np.ndarray, stored: Mapping[str, np.ndarray]
    ) -> tuple[str, np.ndarray, np.ndarray] | None:
        want = np.array([logsumexp(logits / t) for t in spec.temperatures])
        return "lse", want, stored["lse"].astype(np.float64)

    @staticmethod
    def soft_targets(
        spec: StorageSpec,
        arrays: Mapping[str, np.ndarray],
        values: np.ndarray,
        num_classes: int,
        t: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        lse_t, hit = lse_at(arrays["lse"], spec.temperatures, t, num_classes)
        ts = float(spec.sample_temperature or 1.0)
        lse_s, _ = lse_at(arrays["lse"], spec.temperatures, ts, num_classes)
        lp = values / t - lse_t[:, None]
        weight = np.exp(lp - (values / ts - lse_s[:, None])) / values.shape[1]
        return lp, np.zeros(values.shape[0]), weight, hit

    @staticmethod
    def sized(
        size: int, temperatures: tuple[float, ...], num_classes: int, sample_temperature: float
    ) -> tuple[int, tuple[float, ...], float | None]:
        # The importance weights use the sampling temperature's column: it is always recorded.
        ts = sample_temperature
        if not any(math.isclose(ts, t) for t in temperatures):
            temperatures = tuple(sorted((*temperatures, ts)))
        return size, temperatures, ts

    @classmethod
    def record_problems(
        cls, i: int, size: object, temperatures: list, sample_temperature: object, num_classes: int
    ) -> list[str]:
        ts = sample_temperature
        if not (
            isinstance(ts, int | float)
            and not isinstance(ts, bool)
            and any(math.isclose(float(ts), float(t)) for t in temperatures)
        ):
            return [
                f"member {i} storage sampled has sample_temperature {ts!r}, which should be one "
                f"of its temperatures {temperatures}"
            ]
        return []

    @staticmethod
    def arrays(spec: StorageSpec, num_classes: int, dtype: str) -> list[tuple[str, int, str]]:
        s = int(spec.size or 1)
        return [
            ("values", s, dtype),
            ("indices", s, index_dtype(num_classes)),
            ("lse", len(spec.temperatures), "float32"),
        ]

    @staticmethod
    def encode(
        spec: StorageSpec, logits: np.ndarray, dtype: str, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        rows, c = logits.shape
        s = int(spec.size or 1)
        ts = float(spec.sample_temperature or 1.0)
        values = np.empty((rows, s), dtype=dtype)
        indices = np.empty((rows, s), dtype=index_dtype(c))
        lse = np.empty((rows, len(spec.temperatures)), dtype=np.float32)
        u = rng.random((rows, s))  # drawn for the whole block at once: independent of blocking
        step = max(1, ENCODE_BLOCK_ELEMENTS // c)
        for a in range(0, rows, step):
            v = logits[a : a + step].astype(np.float64)
            n = v.shape[0]
            cdf = np.cumsum(_softmax(v, ts), axis=1)
            cdf /= cdf[:, -1:]
            # One searchsorted over all rows: row r's CDF is shifted by r, its draws too.
            shift = np.arange(n, dtype=np.float64)[:, None]
            flat = np.searchsorted((cdf + shift).ravel(), (u[a : a + step] + shift).ravel())
            idx = np.minimum(flat.reshape(n, s) - np.arange(n)[:, None] * c, c - 1)
            idx = np.sort(idx, axis=1)
            indices[a : a + step] = idx
            values[a : a + step] = np.take_along_axis(v, idx, axis=1)
            for j, t in enumerate(spec.temperatures):
                lse[a : a + step, j] = logsumexp(v / t, axis=1)
        return {"values": values, "indices": indices, "lse": lse}

    @staticmethod
    def stored_probs(
        spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int, t: float
    ) -> np.ndarray:
        w = sampled_weights(spec, arrays, t, num_classes)
        out = np.zeros((w.shape[0], num_classes))
        np.add.at(out, (np.arange(w.shape[0])[:, None], arrays["indices"].astype(np.int64)), w)
        return out

    @staticmethod
    def check(spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int) -> list[str]:
        values, idx, lse = arrays["values"], arrays["indices"], arrays["lse"]
        problems = _finite_rows("values", values) + _index_problems(idx, num_classes)
        problems += _finite_rows("lse", lse)
        i64 = idx.astype(np.int64)
        unsorted = np.flatnonzero((np.diff(i64, axis=1) < 0).any(axis=1))
        if unsorted.size:
            problems.append(f"indices are not sorted in rows {unsorted[:10].tolist()}")
        if not problems:
            # The whole row's log-sum-exp is at least any one of its logits / T.
            t = np.asarray(spec.temperatures, dtype=np.float64)
            v64 = values.astype(np.float64)
            vmax = v64.max(axis=1)[:, None]
            # Every stored value is rounded (float16: by up to |v| 2^-11), and at a high T the
            # drawn classes weigh about equally: the slack follows the row's largest |value|,
            # plus float32's rounding of the stored lse.
            slack = (np.abs(v64).max(axis=1)[:, None] * 2.0**-10 + 1e-3) / t
            slack = slack + np.abs(lse) * 2.0**-20
            low = np.flatnonzero((lse < vmax / t - slack).any(axis=1))
            if low.size:
                problems.append(
                    f"lse is smaller than a drawn class's logit allows in rows {low[:10].tolist()}"
                )
            else:
                # The row's lse_T is at least the log-sum-exp of its distinct drawn classes.
                # float32 suffices (the values are float16 at most; the slack covers it) and
                # costs half of float64 on every shard a reader serves.
                v = values.astype(np.float32)
                distinct = np.ones(v.shape, dtype=bool)
                distinct[:, 1:] = np.diff(i64, axis=1) != 0  # indices are sorted
                shifted = np.where(distinct, v - vmax.astype(np.float32), -np.inf)
                drawn = (
                    np.stack(
                        [np.log(np.exp(shifted / np.float32(tj)).sum(axis=1)) for tj in t], axis=1
                    )
                    + vmax / t
                )
                low = np.flatnonzero((lse < drawn - slack).any(axis=1))
                if low.size:
                    problems.append(
                        "lse is smaller than the drawn classes' logits allow in rows "
                        f"{low[:10].tolist()}"
                    )
                bad = lse_curve_rows(lse, spec.temperatures, num_classes, None)
                if bad.size:
                    problems.append(
                        "lse is not the log-sum-exp of one row of logits at the recorded "
                        "temperatures (not convex in 1/T: temperatures reordered or values "
                        f"edited) in rows {bad[:10].tolist()}"
                    )
        return problems


def sampled_weights(
    spec: StorageSpec, arrays: Mapping[str, np.ndarray], t: float, num_classes: int
) -> np.ndarray:
    """(rows, S) importance weights ``(1/S) p_T(i) / p_Ts(i)`` of a sampled member's draws.

    Exact at a recorded ``t``; at another, the row's log-sum-exp is interpolated (:func:`lse_at`).
    """
    v = arrays["values"].astype(np.float64)
    lse = arrays["lse"]
    ts = float(spec.sample_temperature or 1.0)
    lse_t, _ = lse_at(lse, spec.temperatures, t, num_classes)
    lse_s, _ = lse_at(lse, spec.temperatures, ts, num_classes)
    logw = (v / t - lse_t[:, None]) - (v / ts - lse_s[:, None])
    return np.exp(logw) / v.shape[1]


LSE_TOLERANCE = 1e-5  # relative: float32 storage of a float64 log-sum-exp, and its arithmetic


def lse_curve_rows(
    lse: np.ndarray,
    temperatures: Sequence[float],
    count: int,
    slope_max: np.ndarray | None,
) -> np.ndarray:
    """Rows whose recorded log-sum-exps cannot come from one set of ``count`` logits.

    ``f(b) = log sum_i exp(b v_i)`` is convex in ``b = 1/T``, ``f(0) = log(count)``, and its slope
    (the mean logit under the softmax at ``b``) is at most the largest of the ``v_i``. A column
    edited, or the header's temperatures reordered against the columns, breaks this for almost
    every row; float32 storage of the values is allowed for.

    Args:
        lse: (rows, n_T) the recorded values. temperatures: the n_T recorded temperatures.
        count: how many logits each sum runs over.
        slope_max: (rows,) an upper bound on every logit (a top-k tail: ``v_K``), or None.

    Returns:
        Indices of the rows that fail.
    """
    temps = np.asarray(temperatures, dtype=np.float64)
    order = np.argsort(1.0 / temps)
    b = np.concatenate([[0.0], 1.0 / temps[order]])
    f = np.concatenate(
        [np.full((lse.shape[0], 1), math.log(count)), lse[:, order].astype(np.float64)], axis=1
    )
    tol = LSE_TOLERANCE * (1.0 + np.abs(f).max(axis=1, keepdims=True))
    db = np.diff(b)
    slope = np.diff(f, axis=1) / db
    slope_tol = 2 * tol / db
    bad = np.zeros(lse.shape[0], dtype=bool)
    if b.size > 2:  # convex: each slope at least the one before it
        bad |= (slope[:, 1:] < slope[:, :-1] - slope_tol[:, 1:] - slope_tol[:, :-1]).any(axis=1)
    if slope_max is not None:
        vmax = np.asarray(slope_max, dtype=np.float64)[:, None]
        bad |= (slope > vmax + np.abs(vmax) * 2.0**-10 + 1e-3 + slope_tol).any(axis=1)
    return np.flatnonzero(bad)


def _index_problems(idx: np.ndarray, num_classes: int) -> list[str]:
    bad = np.flatnonzero((idx.astype(np.int64) >= num_classes).any(axis=1))
    if bad.size:
        return [f"indices outside 0..{num_classes - 1} in rows {bad[:10].tolist()}"]
    return []


def _temperature_index(spec: StorageSpec, t: float) -> int:
    for j, r in enumerate(spec.temperatures):
        if math.isclose(r, t):
            return j
    raise ValueError(f"temperature {t} is not recorded ({list(spec.temperatures)})")


def store_choices() -> list[str]:
    """What ``--store`` takes: ``auto`` and each kind's syntax (``dense``, ``topk:K``, ...)."""
    return ["auto", *(STORAGE_KINDS[k].SYNTAX for k in STORAGE_KINDS)]


# ---------------------------------------------------------------------------------------- fidelity
def measure_fidelity(
    spec: StorageSpec,
    logits: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """What storing lost, on up to :data:`FIDELITY_ROWS` seeded rows of one shard.

    Args:
        logits: (rows, C) float32 the full raw logits. arrays: what :meth:`StorageKind.encode`
            made of them.

    Returns:
        (n_T, len(FIDELITY_FIELDS)) float64: per recorded temperature, rows measured, sum and max
        of KL(full || stored) (NaN for sampled), sum and min of the kept mass, sum and max of the
        total variation distance.
    """
    rows, c = logits.shape
    pick = np.sort(rng.choice(rows, size=min(rows, FIDELITY_ROWS), replace=False))
    sub = {name: a[pick] for name, a in arrays.items()}
    out = np.zeros((len(spec.temperatures), len(FIDELITY_FIELDS)))
    full = logits[pick].astype(np.float64)
    for j, t in enumerate(spec.temperatures):
        # Probabilities and their logs from one exp pass each (this runs for every member-shard
        # the writer stores, beside the teachers' inference).
        if spec.kind == "sampled":
            p = _softmax(full, t)
            q = spec.impl.stored_probs(spec, sub, c, t)
            kl = np.full(len(pick), np.nan)
            drawn = np.zeros_like(p, dtype=bool)
            np.put_along_axis(drawn, sub["indices"].astype(np.int64), True, axis=1)
            kept = (p * drawn).sum(axis=1)
        else:
            p, log_p = _softmax_and_log(full, t)
            q, log_q = spec.impl.stored_dist(spec, sub, c, t)
            # log_p is finite, so a class with p = 0 adds 0 (as the p > 0 guard did before).
            kl = np.maximum((p * (log_p - log_q)).sum(axis=1), 0.0)
            if spec.kind == "topk":
                kept = np.take_along_axis(p, sub["indices"].astype(np.int64), axis=1).sum(axis=1)
            else:
                kept = np.ones(len(pick))
        tv = 0.5 * np.abs(p - q).sum(axis=1)
        out[j] = (len(pick), kl.sum(), kl.max(), kept.sum(), kept.min(), tv.sum(), tv.max())
    return out


def summarise_fidelity(spec: StorageSpec, per_shard: np.ndarray) -> dict[str, Any]:
    """The header's fidelity record from the shards' (S, n_T, fields) measurements."""
    rows = per_shard[:, :, 0].sum(axis=0)
    safe = np.maximum(rows, 1)

    def clean(values: np.ndarray) -> list[float | None]:
        return [None if not np.isfinite(v) else float(round(v, 8)) for v in values]

    return {
        "rows": int(rows[0]) if rows.size else 0,
        "temperatures": list(spec.temperatures),
        "kl_mean": clean(per_shard[:, :, 1].sum(axis=0) / safe),
        "kl_max": clean(per_shard[:, :, 2].max(axis=0)),
        "kept_mass_mean": clean(per_shard[:, :, 3].sum(axis=0) / safe),
        "kept_mass_min": clean(per_shard[:, :, 4].min(axis=0)),
        "tv_mean": clean(per_shard[:, :, 5].sum(axis=0) / safe),
        "tv_max": clean(per_shard[:, :, 6].max(axis=0)),
    }


def bytes_per_row(spec: StorageSpec, num_classes: int, dtype: str) -> int:
    """Raw (uncompressed) bytes one row of the member costs."""
    return sum(
        width * np.dtype(dt).itemsize for _, width, dt in spec.impl.arrays(spec, num_classes, dtype)
    )
