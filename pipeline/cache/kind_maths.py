"""The maths the storage kinds share (:mod:`pipeline.cache.kinds`): index dtypes, a stable
log-sum-exp, the interpolated ``lse_T`` of a row at any temperature (:func:`lse_at`) and the
convexity checks of stored ``lse`` curves (:func:`lse_curve_rows`), softmaxes and row checks.
Imports without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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


def finite_rows(name: str, a: np.ndarray) -> list[str]:
    bad = np.flatnonzero(~np.isfinite(a.astype(np.float32)).all(axis=1))
    return [f"{name} holds NaN/inf in rows {bad[:10].tolist()}"] if bad.size else []


def softmax(v: np.ndarray, t: float) -> np.ndarray:
    z = v.astype(np.float64) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax_and_log(v: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, C) float64 ``softmax(v / t)`` and its log, from one ``exp`` pass (the log is the
    shifted logits minus the log of the row sums, no ``log`` over every value)."""
    z = np.asarray(v, dtype=np.float64) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1, keepdims=True)
    return e / total, z - np.log(total)


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


def index_problems(idx: np.ndarray, num_classes: int) -> list[str]:
    bad = np.flatnonzero((idx.astype(np.int64) >= num_classes).any(axis=1))
    if bad.size:
        return [f"indices outside 0..{num_classes - 1} in rows {bad[:10].tolist()}"]
    return []
