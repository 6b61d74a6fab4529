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

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from pipeline.cache.kind_maths import softmax, softmax_and_log
from pipeline.registry import Registry, unknown_name

TAIL_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 20.0)
FIDELITY_ROWS = 64  # rows per shard whose fidelity is measured at write time
# Per (shard, temperature): rows measured, then sums and extremes of three measures.
FIDELITY_FIELDS = ("rows", "kl_sum", "kl_max", "kept_sum", "kept_min", "tv_sum", "tv_max")
AUTO_DENSE_MAX_CLASSES = 2048  # dense costs 2 C bytes per row in float16: 4 KB at this C
AUTO_TOPK = 64
ENCODE_BLOCK_ELEMENTS = 1 << 22  # float64 elements per encoding block (32 MiB)


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
            p = softmax(full, t)
            q = spec.impl.stored_probs(spec, sub, c, t)
            kl = np.full(len(pick), np.nan)
            drawn = np.zeros_like(p, dtype=bool)
            np.put_along_axis(drawn, sub["indices"].astype(np.int64), True, axis=1)
            kept = (p * drawn).sum(axis=1)
        else:
            p, log_p = softmax_and_log(full, t)
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
