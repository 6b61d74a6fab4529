"""Sparse soft targets: a batch of top-k or sampled teacher rows at one temperature.

A cache's sparse members (``topk:K``, ``sampled:S``; see :mod:`pipeline.cache.kinds`) reach the
loss as a :class:`SparseTargets` instead of a dense (B, C) tensor: per member, the kept (or drawn)
classes with the teacher's log-probabilities at T, plus the log of the tail bucket's mass (top-k)
or each draw's importance weight (sampled). Temperature is applied when a shard is read (as dense
members are combined at T when read), so a sweep over T never rewrites the cache. The losses
(:mod:`pipeline.training.losses`) turn them into the (K+1)-bucket KL, the unbiased sampled
estimate, or kept-logit matching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.cache.kinds import STORAGE_KINDS, StorageSpec
from pipeline.ensemble import ENSEMBLE_METHODS
from pipeline.errors import CacheError


@dataclass(frozen=True)
class SparseTargets:
    """Sparse teacher rows of M members for B rows, at temperature T.

    Attributes:
        kind: ``topk`` or ``sampled``.
        index: (M, B, K) int64 kept (or drawn) classes.
        logp: (M, B, K) float32 teacher log-probabilities at T of those classes.
        rest: (M, B) float32 log of the tail bucket's mass at T (top-k; ``-inf`` when K = C;
            zeros for sampled).
        weight: (M, B, K) float32 importance weights of the draws (sampled; ones for top-k).
        values: (M, B, K) float32 the stored raw logits (kept-logit matching, agreement).
        num_classes: C.
        method: how members combine: ``mean-probs`` or ``mean-logits``.
    """

    kind: str
    index: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor
    weight: torch.Tensor
    values: torch.Tensor
    num_classes: int
    method: str
    # Whether every member's log-sum-exps are recorded at T (not interpolated): the sampled
    # estimate is unbiased only then (an interpolated lse is too high, biasing it negative).
    exact: bool = True

    _ROW_FIELDS = ("index", "logp", "rest", "weight", "values")

    def __len__(self) -> int:
        return int(self.index.shape[1])

    def __getitem__(self, rows: torch.Tensor | slice | np.ndarray) -> SparseTargets:
        """The targets of the selected rows (dimension 1 of every tensor)."""
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(rows)
        if (
            isinstance(rows, torch.Tensor)
            and rows.dim() == 1
            and not rows.is_floating_point()
            and rows.dtype != torch.bool
        ):
            # A gather of row numbers: index_select copies whole rows, where advanced indexing on
            # dimension 1 runs a general indexing kernel (8 ms vs 0.04 ms for a 1024-row batch
            # of 3 x 20 classes on the 2-core test machine).
            return self.take(rows)
        return replace(self, **{f: getattr(self, f)[:, rows] for f in self._ROW_FIELDS})

    def take(self, rows: torch.Tensor) -> SparseTargets:
        """The targets of rows ``rows`` ((n,) integer row numbers), in that order (copies)."""
        rows = rows.to(device=self.index.device, dtype=torch.int64)
        return replace(
            self, **{f: getattr(self, f).index_select(1, rows) for f in self._ROW_FIELDS}
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseTargets:
        return replace(
            self,
            **{f: getattr(self, f).to(device, non_blocking=non_blocking) for f in self._ROW_FIELDS},
        )

    @classmethod
    def cat(
        cls, parts: Sequence[SparseTargets], space: dict[str, torch.Tensor] | None = None
    ) -> SparseTargets:
        """Rows of several blocks, in order.

        Args:
            space: tensors to join into, by field, reused when their shape is the joined one
                (and replaced when not): the result then shares their memory, and the next join
                into the same ``space`` overwrites it.
        """
        first = parts[0]
        joined = {}
        for f in cls._ROW_FIELDS:
            tensors = [getattr(p, f) for p in parts]
            if space is None:
                joined[f] = torch.cat(tensors, dim=1)
                continue
            shape = list(tensors[0].shape)
            shape[1] = sum(int(t.shape[1]) for t in tensors)
            held = space.get(f)
            if held is None or list(held.shape) != shape or held.dtype != tensors[0].dtype:
                held = space[f] = torch.empty(shape, dtype=tensors[0].dtype)
            joined[f] = torch.cat(tensors, dim=1, out=held)
        return replace(first, **joined)

    def grouped(self, per: int) -> SparseTargets:
        """Rows grouped ``per`` at a time: (M, rows, ...) -> (M, rows / per, per, ...), so that a
        sample's ``per`` rows (a sequence's positions) are indexed, shuffled and served together
        (dimension 1 is then the sample)."""
        return replace(
            self,
            **{
                f: getattr(self, f).reshape(
                    getattr(self, f).shape[0], -1, per, *getattr(self, f).shape[2:]
                )
                for f in self._ROW_FIELDS
            },
        )

    @property
    def is_grouped(self) -> bool:
        return self.index.dim() == 4

    def flat(self) -> SparseTargets:
        """The inverse of :meth:`grouped`: one row per (sample, position) again."""
        if not self.is_grouped:
            return self
        return replace(
            self,
            **{f: getattr(self, f).flatten(1, 2) for f in self._ROW_FIELDS},
        )

    def probs(self) -> torch.Tensor:
        """(B, C) the members' mean mass per class (kept classes only; tails left out); (B, P, C)
        for grouped targets (a batch of token sequences, as ``CacheDataset`` serves them)."""
        if self.is_grouped:
            batch, positions = self.index.shape[1:3]
            return self.flat().probs().reshape(batch, positions, self.num_classes)
        members, rows, _ = self.index.shape
        out = torch.zeros(rows, self.num_classes, dtype=torch.float32, device=self.index.device)
        # Top-k: the kept probabilities; sampled: the draws' weights, whose sum per class is an
        # unbiased estimate of its probability at T.
        mass = self.weight if STORAGE_KINDS[self.kind].WEIGHTED else self.logp.exp()
        for m in range(members):
            out.scatter_add_(1, self.index[m], mass[m])
        return out / members

    def top_class(self) -> torch.Tensor:
        """(B,) the class the ensemble ranks first (the top-1 of the stored classes' mass); (B, P)
        for grouped targets, as a dense (B, P, C) batch's ``argmax(-1)``."""
        return self.probs().argmax(dim=-1)


def group_rows(targets: torch.Tensor | SparseTargets, per: int) -> torch.Tensor | SparseTargets:
    """A sample's ``per`` consecutive rows as one item: dense (rows, C) -> (rows / per, per, C);
    sparse via :meth:`SparseTargets.grouped`. ``per`` = 1 changes nothing."""
    if per == 1:
        return targets
    if isinstance(targets, SparseTargets):
        return targets.grouped(per)
    return targets.reshape(-1, per, *targets.shape[1:])


def flat_rows(targets: torch.Tensor | SparseTargets | None, dense_dims: int = 2):
    """A batch's grouped targets (:func:`group_rows`) back to one row per (sample, position):
    what the losses take. Ungrouped targets pass through."""
    if targets is None:
        return None
    if isinstance(targets, SparseTargets):
        return targets.flat()
    return targets.flatten(0, 1) if targets.dim() > dense_dims else targets


def cat_targets(parts: Sequence[torch.Tensor | SparseTargets]) -> torch.Tensor | SparseTargets:
    """Concatenate blocks of dense (rows, C) tensors or of :class:`SparseTargets`."""
    if isinstance(parts[0], SparseTargets):
        return SparseTargets.cat(parts)  # type: ignore[arg-type]
    return torch.cat(parts)  # type: ignore[arg-type]


def sparse_rows(
    specs: Sequence[StorageSpec],
    arrays: Sequence[dict[str, np.ndarray]],
    num_classes: int,
    method: str,
    temperature: float,
) -> SparseTargets:
    """The :class:`SparseTargets` of one block of rows of sparse members, at ``temperature``.

    Args:
        specs: the members' storage (one kind and size for all).
        arrays: each member's stored arrays for the block (``LogitCache.read_member``).
    """
    kind = specs[0].kind
    t = float(temperature)
    index, logp, rest, weight, values = [], [], [], [], []
    exact = True
    for spec, a in zip(specs, arrays, strict=True):
        v = a["values"].astype(np.float64)
        lp, r, w, hit = spec.impl.soft_targets(spec, a, v, num_classes, t)
        exact = exact and hit
        logp.append(lp)
        rest.append(r)
        weight.append(w)
        index.append(a["indices"].astype(np.int64))
        values.append(v)

    def stack(xs: list[np.ndarray], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.from_numpy(np.stack(xs)).to(dtype)

    return SparseTargets(
        kind,
        stack(index, torch.int64),
        stack(logp),
        stack(rest),
        stack(weight),
        stack(values),
        num_classes,
        method,
        exact,
    )


def temperature_exact(specs: Sequence[StorageSpec], temperature: float) -> bool:
    """Whether every sparse member recorded ``temperature`` (else its tail or row log-sum-exp is
    interpolated)."""
    return all(any(math.isclose(t, temperature) for t in s.temperatures) for s in specs if s.sparse)


# -------------------------------------------------------------------------------------- the losses
def sparse_kl(
    student_logits: torch.Tensor, targets: SparseTargets, temperature: float
) -> torch.Tensor:
    """Per-row KL of the teacher's stored distribution to the student's, at T.

    - top-k: the (K+1)-bucket KL: the student's full softmax at T collapsed onto the member's
      kept classes plus one tail bucket, against the teacher's exact buckets. ``mean-probs``
      averages the members' bucket KLs (the cross-entropy is linear in the target, so this is
      the mixture's gradient); ``mean-logits`` (several members) first forms the geometric mean
      over the union of kept classes with each member's tail spread evenly (one bucket for the
      rest).
    - sampled: ``sum_s w_s (log p_T(i_s) - log q_T(i_s))``, unbiased for the KL and for its
      gradient; members averaged (``mean-probs``).

    Args:
        student_logits: (B, C) raw student logits.

    Returns:
        (B,) float32.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = targets
    members = t.index.shape[0]
    weighted = STORAGE_KINDS[t.kind].WEIGHTED
    if not weighted and ENSEMBLE_METHODS.get(t.method).geometric and members > 1:
        return _geometric_bucket_kl(log_q, t)
    out = log_q.new_zeros(log_q.shape[0])
    for m in range(members):
        lq = log_q.gather(1, t.index[m])
        if weighted:
            estimate = (t.weight[m] * (t.logp[m] - lq)).sum(dim=1)
            if t.exact:
                check_sampled_estimate(estimate, m)
            out = out + estimate
            continue
        kept = (t.logp[m].exp() * (t.logp[m] - lq)).sum(dim=1)
        tail_lq = torch.logsumexp(log_q.scatter(1, t.index[m], float("-inf")), dim=1)
        has_tail = torch.isfinite(t.rest[m])
        rest = torch.where(has_tail, t.rest[m], torch.zeros_like(t.rest[m]))
        tail = torch.where(has_tail, rest.exp() * (rest - torch.where(has_tail, tail_lq, 0.0)), 0.0)
        out = out + kept + tail
    return out / members


# A batch's mean sampled KL estimate below -(floor + sigmas x its standard error) is not noise.
NEGATIVE_KL_FLOOR = 0.05
NEGATIVE_KL_SIGMAS = 6.0
NEGATIVE_KL_MIN_ROWS = 32  # fewer rows make a t-test of few degrees of freedom: no verdict


def check_sampled_estimate(estimate: torch.Tensor, member: int) -> None:
    """Stop when a batch's sampled KL estimates say the stored rows are not a distribution.

    Each row's ``sum_s w_s (log p_T(i_s) - log q_T(i_s))`` is an unbiased estimate of a KL
    divergence at a recorded T (the only place this is asked), which is >= 0: single rows may
    be negative, but the mean of a batch of at least :data:`NEGATIVE_KL_MIN_ROWS` rows far below
    zero (beyond :data:`NEGATIVE_KL_SIGMAS` standard errors and :data:`NEGATIVE_KL_FLOOR`) means the
    log-sum-exps or values the weights come from were altered (a shifted ``lse`` column makes
    every ``log p_T`` too small), and the gradient would push the student away from the teacher.

    Args:
        estimate: (B,) the per-row estimates of one member.

    Raises:
        CacheError: the batch mean is negative beyond its noise.
    """
    rows = estimate.shape[0]
    if rows < NEGATIVE_KL_MIN_ROWS:
        return
    est = estimate.detach().double()
    mean = float(est.mean())
    se = float(est.std()) / math.sqrt(rows)
    if mean < -(NEGATIVE_KL_FLOOR + NEGATIVE_KL_SIGMAS * se):
        raise CacheError(
            f"sampled member {member}'s KL estimate over a batch of {rows} rows is {mean:.3f} "
            f"(standard error {se:.3f}); a KL divergence is never negative, so the cached "
            "log-sum-exps (lse) or values do not describe the teacher's distribution at this "
            "temperature: they were altered. Run `kd-pipeline cache verify --replay N --teacher "
            "PATH` on the cache to find the rows, and restore it from a good copy"
        )


def _geometric_bucket_kl(log_q: torch.Tensor, t: SparseTargets) -> torch.Tensor:
    """``mean-logits`` over top-k members: buckets = the union of kept classes + the rest."""
    members, rows, k = t.index.shape
    c = t.num_classes
    share = math.log(c - k) if c > k else 0.0
    log_g = log_q.new_zeros(rows, c)
    union = torch.zeros(rows, c, dtype=torch.bool, device=log_q.device)
    for m in range(members):
        dense = (t.rest[m] - share)[:, None].expand(rows, c).clone()
        log_g += dense.scatter(1, t.index[m], t.logp[m]) / members
        union.scatter_(1, t.index[m], True)
    log_g = torch.log_softmax(log_g, dim=1)  # the geometric mean, renormalised
    kept = torch.where(union, log_g.exp() * (log_g - log_q), 0.0).sum(dim=1)
    g_rest = torch.logsumexp(log_g.masked_fill(union, float("-inf")), dim=1)
    q_rest = torch.logsumexp(log_q.masked_fill(union, float("-inf")), dim=1)
    has_rest = torch.isfinite(g_rest)
    g_rest0 = torch.where(has_rest, g_rest, 0.0)
    tail = torch.where(
        has_rest, g_rest0.exp() * (g_rest0 - torch.where(has_rest, q_rest, 0.0)), 0.0
    )
    return kept + tail


def kept_logit_mse(student_logits: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """``(1/2K) sum_k (z'_k - v'_k)^2`` over each top-k member's kept classes, members averaged.

    ``z'`` and ``v'`` are the student's and the teacher's logits of the kept classes with the
    kept ones' mean removed (the tail's logits are not stored, so they are not matched).

    Returns:
        scalar: the batch mean.
    """
    z = student_logits.float()
    members = targets.index.shape[0]
    total = z.new_zeros(())
    for m in range(members):
        zk = z.gather(1, targets.index[m])
        vk = targets.values[m]
        diff = (zk - zk.mean(dim=1, keepdim=True)) - (vk - vk.mean(dim=1, keepdim=True))
        total = total + 0.5 * diff.pow(2).mean(dim=1).mean()
    return total / members
