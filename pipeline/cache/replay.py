"""The proof that a cache's rows are what the teacher gives (``cache verify --replay N``).

``cache verify --replay N --teacher PATH`` re-runs the teacher PATH on N stored rows.

N stored rows are drawn (seeded), each view's input is rebuilt from the original sample and the
view's stored parameters (:meth:`pipeline.augment.Augment.apply`), the teacher runs on it, and
everything the row stores is recomputed from its full logits, by storage kind: every logit of a
dense row; the kept values of a top-k row (at their stored class indices, which must be the top
k) and its tail log-sum-exp at every recorded temperature; the drawn classes' values of a sampled
row, its whole-row log-sum-exp at every recorded temperature, and its classes themselves (redrawn
from the row's seeded uniforms at the sampling temperature). Values must agree to the storage
dtype's rounding (one float16 unit in the last place, or float32 arithmetic noise from another
batch composition): a row whose values, log-sum-exps, draws or view parameters were altered gives
other numbers, and is named. (Read-time checks catch what contradicts the row itself; only the
replay, which has the teacher's full logits, sees a tail shifted within its bounds or a sampling
temperature changed in the header.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.augment import ViewPlan
from pipeline.cache.header import thaw
from pipeline.cache.location import CacheLocation
from pipeline.cache.read import LogitCache
from pipeline.cache.transfer import load_transfer_set
from pipeline.checkpoints import load_checkpoint, member_paths
from pipeline.errors import CacheError
from pipeline.metrics import predict_logits

FLOAT32_TOLERANCE = 1e-4  # relative: the same inputs in another batch may round differently


@dataclass
class ReplayReport:
    """What the replay found: ``problems`` empty means every checked view matched."""

    checked: int = 0
    members: list[int] = field(default_factory=list)
    worst: float = 0.0  # largest difference seen, in units of its tolerance
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def tolerance(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Per value: how far a recomputed logit may be from the stored one."""
    v = np.abs(stored.astype(np.float32))
    if dtype == "float16":
        ulp = np.spacing(np.abs(stored.astype(np.float16))).astype(np.float32)
        return ulp + FLOAT32_TOLERANCE * np.maximum(v, 1)
    return FLOAT32_TOLERANCE * np.maximum(v, 1)


def replay_views(
    location: str | CacheLocation,
    teachers: Sequence[str],
    n: int,
    dataset: str | None = None,
    data_dir: str | None = None,
    trust_code: Sequence[str] = (),
    seed: int = 0,
) -> ReplayReport:
    """Re-run the teacher on ``n`` stored rows rebuilt from their parameters; see the module doc.

    Args:
        teachers: checkpoints or ensemble directories; each is matched to the cache member with
            its sha256 (members without a given checkpoint are not checked).
        dataset: this machine's copy of the cache's transfer set (checked by fingerprint).

    Raises:
        CacheError: no given checkpoint is a member of the cache.
    """
    cache = LogitCache(CacheLocation.parse(location), allow_partial=True)
    h = cache.header
    rep = ReplayReport()
    by_sha = {}
    for t in teachers:
        for p in member_paths(t):
            lm = load_checkpoint(p, "cpu", trust_code)
            by_sha[lm.sha256] = lm
    members = [m.index for m in h.members if m.checkpoint_sha256 in by_sha]
    if not members:
        raise CacheError(
            f"{cache.location}: none of the given teachers is a member of the cache (members: "
            + ", ".join(f"{m.path} ({m.checkpoint_sha256[:19]})" for m in h.members)
            + "); give the checkpoints the cache was made with"
        )
    rep.members = members
    if h.positions > 1:
        raise CacheError(
            f"{cache.location}: --replay re-runs image teachers on their stored views; this is "
            f"a token cache ({h.positions} positions per sample), which it does not replay. "
            "Run `kd-pipeline cache verify` without --replay (it checks every stored row)"
        )
    data = load_transfer_set(cache, dataset, data_dir)
    plan = None
    if h.augment is not None:
        shape = tuple(data.sample_shape)[-2:]
        plan = ViewPlan.from_record(thaw(h.augment), h.views, h.seed or 0, shape)
    else:
        rep.notes.append("the cache has no augmented views: its rows are replayed as they are")
    done = cache.done_shards(members)
    rows_done = np.concatenate([np.arange(*h.row_bounds(int(s))) for s in done])
    if not rows_done.size:
        rep.notes.append("no finished shards: nothing to replay")
        return rep
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(rows_done, size=min(n, rows_done.size), replace=False))
    v = h.views
    samples = rows // v
    x = data.x[samples]
    params = None
    if plan is not None:
        params = np.concatenate(
            [_params_row(cache, int(r)) for r in rows]
        )  # reads the chunks holding the chosen rows
        x = plan.augment_pipeline.apply(x, params)
    ids = np.asarray(data.ids)[samples]
    for m in members:
        fresh = predict_logits(
            by_sha[h.members[m].checkpoint_sha256].model, x, torch.device("cpu")
        ).numpy()
        for i, r in enumerate(rows):
            stored = _stored_row(cache, m, int(r))
            idx = stored.get("indices")
            values = stored["logits"] if idx is None else stored["values"]
            cls = np.arange(h.num_classes) if idx is None else idx.astype(np.int64)
            diff = np.abs(fresh[i, cls] - values.astype(np.float32))
            tol = tolerance(values, h.dtype)
            ratio = float((diff / tol).max())
            problem = None
            if ratio > 1:
                problem = f"logits differ from the cached ones by up to {float(diff.max()):.4g}"
            elif h.storage(m).impl.KEEPS_TOP:
                rest = np.delete(fresh[i], cls)
                if rest.size and rest.max() > values.astype(np.float32).min() + tol.max():
                    problem = "its stored classes are not the teacher's top k on the rebuilt view"
            if problem is None:
                problem = _derived_problem(cache, m, int(r), fresh[i], stored)
            rep.worst = max(rep.worst, ratio)
            if problem:
                what = f"view {r % v} of sample id {int(ids[i])} (row {int(r)})"
                shown = (
                    "" if params is None else f" from stored parameters {_show(plan, params[i])}"
                )
                rep.problems.append(
                    f"replay: {what}, member {m}: the teacher's output on the input rebuilt"
                    f"{shown}: {problem} (tolerance {float(tol.max()):.3g}); the view's "
                    "parameters or logits were altered, or the teacher differs"
                )
        rep.checked += len(rows)
    return rep


def _derived_problem(
    cache: LogitCache, member: int, row: int, fresh: np.ndarray, stored: dict[str, np.ndarray]
) -> str | None:
    """What a sparse row derives from the full logits, recomputed from ``fresh`` (C,): a top-k
    row's tail log-sum-exps, a sampled row's whole-row log-sum-exps and its draws (redrawn from
    the seeded uniforms at the sampling temperature). None when all agree."""
    h = cache.header
    spec = h.storage(member)
    if not spec.sparse:
        return None
    v = fresh.astype(np.float64)
    temps = np.asarray(spec.temperatures, dtype=np.float64)
    idx = stored["indices"].astype(np.int64)
    derived = spec.impl.derived(spec, v, idx, stored)
    if derived is None:
        return None
    what, want, got = derived
    # The teacher's logits agree to FLOAT32_TOLERANCE relative; a log-sum-exp moves by at most
    # the largest logit change / T.
    tol = FLOAT32_TOLERANCE * (np.maximum(np.abs(want), 1) + np.abs(v).max() / temps)
    off = np.flatnonzero(np.abs(got - want) > tol)
    if off.size:
        j = int(off[0])
        return (
            f"its {what} at T={temps[j]:g} is {got[j]:.6g}, the teacher's logits give {want[j]:.6g}"
        )
    if spec.impl.WEIGHTED:  # weighted rows are seeded draws: redraw them
        return _draw_problem(cache, member, row, v, idx)
    return None


def _draw_problem(
    cache: LogitCache, member: int, row: int, v: np.ndarray, idx: np.ndarray
) -> str | None:
    """A sampled row's classes against the draws its seeded uniforms give at Ts.

    The writer drew ``u`` (rows, S) for the shard from ``default_rng([seed, member, shard])`` and
    took, for each, the first class whose CDF at Ts reaches it; the classes are stored sorted, so
    the sorted ``u`` must fall in the sorted classes' CDF intervals (up to the logits' rounding).
    """
    h = cache.header
    spec = h.storage(member)
    shard = row // h.shard_rows
    start, stop = h.row_bounds(shard)
    draws = cache.__dict__.setdefault("_replay_draws", {})
    if (member, shard) not in draws:
        draws.clear()  # rows come in order: one shard's uniforms at a time bound the memory
        rng = np.random.default_rng([h.seed or 0, member, shard])
        draws[(member, shard)] = rng.random((stop - start, idx.size))
    u = np.sort(draws[(member, shard)][row - start])
    ts = float(spec.sample_temperature or 1.0)
    z = v / ts
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    low = np.concatenate([[0.0], cdf])[idx]
    high = cdf[idx]
    eps = 2 * FLOAT32_TOLERANCE * (1 + np.abs(v).max() / ts)
    bad = np.flatnonzero((u < low - eps) | (u > high + eps))
    if bad.size:
        s = int(bad[0])
        return (
            f"its drawn classes {idx.tolist()} are not the ones its seeded draws give at the "
            f"sampling temperature Ts={ts:g} (draw {s}: u={u[s]:.4f} falls outside class "
            f"{int(idx[s])}'s interval [{low[s]:.4f}, {high[s]:.4f}]); the header's "
            "sample_temperature or seed, or the indices, were altered"
        )
    return None


def _params_row(cache: LogitCache, row: int) -> np.ndarray:
    shard = row // cache.header.shard_rows
    start = cache.header.row_bounds(shard)[0]
    return cache.read_view_params(shard)[row - start : row - start + 1]


def _stored_row(cache: LogitCache, member: int, row: int) -> dict[str, np.ndarray]:
    shard = row // cache.header.shard_rows
    start = cache.header.row_bounds(shard)[0]
    arrays = cache.__dict__.setdefault("_replay_rows", {})
    if (member, shard) not in arrays:
        arrays[(member, shard)] = cache.read_member(shard, member)
    return {k: a[row - start] for k, a in arrays[(member, shard)].items()}


def _show(plan: object, params: np.ndarray) -> str:
    names = plan.augment_pipeline.params  # type: ignore[attr-defined]
    return "{" + ", ".join(f"{k}={float(p):g}" for k, p in zip(names, params, strict=True)) + "}"
