"""The built-in storage kinds, registered in :data:`pipeline.cache.kinds.STORAGE_KINDS` in this
order (the order ``--store`` and messages list them): ``dense`` (every raw logit), ``topk:K``
(the K largest logits and the tail's ``lse_T``) and ``sampled:S`` (S classes drawn from the
teacher's distribution, with importance weights: :func:`sampled_weights`). What each stores and
why is described in :mod:`pipeline.cache.kinds`. Imports without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pipeline.cache.kind_maths import (
    finite_rows,
    index_dtype,
    index_problems,
    logsumexp,
    lse_at,
    lse_curve_rows,
    softmax,
    softmax_and_log,
)
from pipeline.cache.kinds import (
    ENCODE_BLOCK_ELEMENTS,
    STORAGE_KINDS,
    StorageKind,
    StorageSpec,
    as_dtype,
)


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
        return softmax(arrays["logits"], t)

    @classmethod
    def stored_dist(
        cls, spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int, t: float
    ) -> tuple[np.ndarray, np.ndarray]:
        return softmax_and_log(arrays["logits"], t)

    @staticmethod
    def check(spec: StorageSpec, arrays: Mapping[str, np.ndarray], num_classes: int) -> list[str]:
        return finite_rows("logits", arrays["logits"])


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
        problems = finite_rows("values", values) + index_problems(idx, num_classes)
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


def _temperature_index(spec: StorageSpec, t: float) -> int:
    for j, r in enumerate(spec.temperatures):
        if math.isclose(r, t):
            return j
    raise ValueError(f"temperature {t} is not recorded ({list(spec.temperatures)})")


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
            cdf = np.cumsum(softmax(v, ts), axis=1)
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
        problems = finite_rows("values", values) + index_problems(idx, num_classes)
        problems += finite_rows("lse", lse)
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
