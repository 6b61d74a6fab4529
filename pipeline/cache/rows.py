"""The checks of a cache's row keys: the row index and the views' parameters.

A format-2 cache is a table of rows keyed by (sample, view, position)
(docs/cache-format.md).
What a storage kind stores in a row is checked by the kind (:meth:`StorageKind.check`); what says
*which* row belongs to which sample and view is checked here, by every reader (training's memory
and streaming loaders, DDP ranks, workers), by ``cache verify`` and before ``cache copy``/``pack``
finish. Both keys are fully determined by the header, so they are re-derived and compared, never
trusted:

- ``row_start`` / ``row_count``: sample i's rows are ``i * V * P .. (i + 1) * V * P - 1`` (rows are
  ordered by sample, then view, then position). An edited entry would make a sample train on
  another's rows (or, negative, wrap to the end).
- ``view_params``: view v of sample i was drawn from a counter-based generator keyed by (header
  seed, sample id, v) (:meth:`pipeline.augment.ViewPlan.params`), so the stored parameters are
  drawn again and must be equal (float32, bit for bit up to one unit of rounding). An edited
  parameter (a shift of 2 pixels made 1, or 0.5) would pair the teacher's row with an input it
  never saw.

This module imports without torch.
"""

from __future__ import annotations

import numpy as np

from pipeline.augment import ViewPlan
from pipeline.cache.header import CacheHeader, thaw

PARAM_TOLERANCE = 1e-6  # relative: the same float32 arithmetic on another machine


def row_index_problems(h: CacheHeader, row_start: np.ndarray, row_count: np.ndarray) -> list[str]:
    """What is wrong with a cache's row index (``row_start``, ``row_count``); empty when sound.

    Args:
        row_start: (N,) int64 as stored. row_count: (N,) int32 as stored.
    """
    per_sample = h.shard_rows // h.rows_per_shard
    problems = []
    for name, values, want in (
        ("row_start", row_start, np.arange(h.n, dtype=np.int64) * per_sample),
        ("row_count", row_count, np.full(h.n, per_sample, dtype=np.int64)),
    ):
        bad = np.flatnonzero(np.asarray(values, dtype=np.int64) != want)
        if bad.size:
            problems.append(
                f"array {name} disagrees with the header's row layout ({per_sample} rows per "
                f"sample, in sample order) at samples {bad[:10].tolist()} (holds "
                f"{np.asarray(values)[bad[:10]].tolist()}, expected {want[bad[:10]].tolist()})"
            )
    return problems


def view_plan(h: CacheHeader) -> ViewPlan | None:
    """The views a cache header records (None without views).

    Raises:
        ConfigError: the record's augmentation version or parameter schema is not this
            kd-pipeline's.
    """
    if h.augment is None:
        return None
    shape = tuple(h.dataset.sample_shape or ())[-2:]
    return ViewPlan.from_record(thaw(h.augment), h.views, h.seed or 0, shape)


def view_param_problems(
    plan: ViewPlan, ids: np.ndarray, params: np.ndarray, first_row: int = 0
) -> list[str]:
    """Stored view parameters against the ones drawn again from (seed, sample id, view).

    Args:
        plan: :func:`view_plan` of the cache.
        ids: (n,) the sample ids whose rows ``params`` holds (whole samples, every view).
        params: (n * V, P) float32 the stored parameters of those rows.
        first_row: the cache row of ``params[0]`` (named in the message).

    Returns:
        One problem naming the first rows that differ, or nothing.
    """
    want = plan.params(np.asarray(ids, dtype=np.int64))
    if want.shape != params.shape:
        return [f"view_params hold shape {params.shape} for these rows, expected {want.shape}"]
    stored = params.astype(np.float64)
    tol = PARAM_TOLERANCE * np.maximum(np.abs(want), 1.0)
    off = np.abs(stored - want) > tol
    off |= ~np.isfinite(stored)
    rows = np.flatnonzero(off.any(axis=1))
    if not rows.size:
        return []
    names = plan.augment_pipeline.params
    r = int(rows[0])
    cols = np.flatnonzero(off[r])
    shown = ", ".join(
        f"{names[c]}={float(stored[r, c]):g} (drawn: {float(want[r, c]):g})" for c in cols[:4]
    )
    v = plan.views
    return [
        f"view_params of {rows.size} rows differ from the ones drawn again from the cache's seed "
        f"(rows {(rows[:10] + first_row).tolist()}; row {r + first_row}, view {r % v} of sample "
        f"id {int(ids[r // v])}: {shown}): the parameters were edited, and those views would "
        "pair the teacher's rows with inputs it never saw"
    ]
