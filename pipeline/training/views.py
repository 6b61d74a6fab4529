"""Stage two on view caches: sample stored views, replay their parameters, train on their rows.

A view cache (``cache-logits --views K --augment SPEC``) holds, per sample, K rows of teacher
logits, one per augmented view, and each view's explicit parameters (``view_params``). A run
from it picks ``--views-per-epoch`` of the K views per sample per epoch (seeded by the training
seed, the epoch and the sample id, so both loader modes pick the same views), rebuilds each
chosen view by replaying its stored parameters on the original input
(:meth:`pipeline.augment.Augment.apply`, exact), and trains on that view's own cached row: row
``sample * K + view``, never a row matched by batch order.

How a run uses views is recorded in its ``metrics.json`` (``views``):

- ``consistent``: stored views replayed with their own targets (a view cache), or an online
  teacher that sees the same live view as the student;
- ``inconsistent``: live augmentation (``--augment``) of the student's inputs while the targets
  are a cache's rows for other (unaugmented) inputs;
- ``none``: no augmentation (a plain cache; a view cache with ``--views-per-epoch 0`` trains on
  the unaugmented identity view 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.augment import ViewPlan, live_augment, view_uniforms
from pipeline.cache.read import LogitCache
from pipeline.distributed import batch_spans
from pipeline.errors import ConfigError
from pipeline.training.config import StudentConfig
from pipeline.training.loader import (
    PREFETCH_SHARDS,
    LoaderPlan,
    StreamingCacheSource,
    shard_targets,
    target_bytes_per_row,
)
from pipeline.training.targets import SparseTargets

MODES = ("consistent", "inconsistent", "none")


# -------------------------------------------------------------------------------------- selection
def cache_views(cache: LogitCache) -> ViewPlan | None:
    """The views a cache holds (None for a cache without augmented views).

    Raises:
        ConfigError: the cache's augmentation is of another version or parameter schema.
    """
    h = cache.header
    if h.augment is None:
        return None
    shape = tuple(cache.dataset.sample_shape or ())
    return ViewPlan.from_record(_plain(h.augment), h.views, h.seed or 0, shape[-2:])


def _plain(value: object) -> object:
    from pipeline.cache.header import thaw

    return thaw(value)


def pick_views(seed: int, epoch: int, ids: np.ndarray, views: int, k: int) -> np.ndarray:
    """(n, k) the views each sample (by id) serves in ``epoch``: distinct while k <= views (a
    seeded permutation's first k; beyond that the permutation repeats).

    Keyed by (seed, epoch, sample id) alone, so in-memory and streaming runs, and any shard order,
    pick the same views.
    """
    key = int(np.random.SeedSequence([seed, epoch, 0x71E35]).generate_state(1, np.uint64)[0])
    order = np.argsort(view_uniforms(key, ids, views, 1)[..., 0], axis=1, kind="stable")
    return order[:, np.arange(k) % views]


@dataclass(frozen=True)
class ViewUse:
    """How a run uses views: its mode and what serves them (the run's ``views`` record).

    Attributes:
        mode: ``consistent``, ``inconsistent`` or ``none``.
        plan: the cache's views (None: a cache without views, or an online teacher).
        per_epoch: views per sample per epoch served from the cache (0: the identity view only).
        live: the live augmentation spec (``--augment``), if any.
    """

    mode: str
    plan: ViewPlan | None
    per_epoch: int
    live: str | None
    online: bool = False

    @property
    def replays(self) -> bool:
        """Whether batches come from the view source (stored views, or view 0 of a view cache)."""
        return self.plan is not None

    def record(self) -> dict:
        out: dict = {"mode": self.mode, "live_augment": self.live}
        if self.online:
            out["source"] = "online teacher (sees the student's view)"
        if self.plan is not None:
            out.update(
                {
                    "cache_views": self.plan.views,
                    "cache_augment": self.plan.augment,
                    "include_identity": self.plan.include_identity,
                    "views_per_epoch": self.per_epoch,
                    "served": (
                        f"{self.per_epoch} stored view(s) per sample per epoch, parameters "
                        "replayed, each with its own cached row"
                        if self.per_epoch
                        else "view 0 (the unaugmented input) of every sample"
                    ),
                }
            )
        return out


def view_use(cfg: StudentConfig, cache: LogitCache | None) -> ViewUse:
    """Decide how ``cfg`` uses views with ``cache`` (None: an online teacher).

    Raises:
        ConfigError: options that contradict the cache (more views than a plain cache holds,
            --views-per-epoch 0 without an identity view, more views per epoch than the cache
            stores, --augment on top of replayed views).
    """
    if cache is None:
        mode = "consistent" if cfg.augment else "none"
        return ViewUse(mode, None, 1, cfg.augment, online=True)
    plan = cache_views(cache)
    k = cfg.views_per_epoch
    if plan is None:
        if k > 1:
            raise ConfigError(
                [
                    f"--views-per-epoch {k}: {cfg.cache} holds one unaugmented row per sample; "
                    "make a view cache (cache-logits --views K --augment SPEC) for more"
                ]
            )
        return ViewUse("inconsistent" if cfg.augment else "none", None, 1, cfg.augment)
    if k == 0:
        if not plan.include_identity:
            raise ConfigError(
                [
                    f"--views-per-epoch 0 trains on the unaugmented input with view 0's targets, "
                    f"but view 0 of {cfg.cache} is augmented ({plan.augment}, made without "
                    "--include-identity); use --views-per-epoch 1 or more"
                ]
            )
        return ViewUse("inconsistent" if cfg.augment else "none", plan, 0, cfg.augment)
    if k > plan.views:
        # More than the stored views would serve some views twice per epoch while the run's
        # record claimed k distinct ones: refuse instead of repeating them silently.
        raise ConfigError(
            [
                f"--views-per-epoch {k} is more than the {plan.views} view(s) per sample "
                f"{cfg.cache} stores; use --views-per-epoch {plan.views} or fewer, or make a "
                f"cache with more views (cache-logits --views {k} --augment {plan.augment})"
            ]
        )
    if cfg.augment:
        raise ConfigError(
            [
                f"--augment {cfg.augment} with --views-per-epoch {k}: the cache's views "
                f"({plan.augment}) are already replayed with their own targets, augmenting them "
                "again would make them inconsistent; use --views-per-epoch 0 --augment SPEC for "
                "the inconsistent baseline"
            ]
        )
    return ViewUse("consistent", plan, k, None)


def live_transform(spec: str, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fit``'s augment hook: fresh parameters every step, seeded by the run's seed."""
    fn = live_augment(spec, seed)

    def run(xb: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(fn(xb.detach().cpu().numpy())).to(xb.device)

    return run


# --------------------------------------------------------------------------------------- sources
class ViewMemorySource:
    """Views of a cache held in memory: each epoch, ``k`` stored views per sample, replayed.

    Args:
        x: (N, C, H, W) original inputs; labels: (N,) or None; ids: (N,) sample ids.
        teacher: (N * V, C) combined targets (or sparse ones), rows ordered by sample then view.
        params: (N * V, P) float32 stored view parameters.
        plan: the cache's views; k: views per sample per epoch (0: view 0, unaugmented).
        seed: picks the views and shuffles the rows (with the epoch).
        rank: ``(k, K)``: serve rank k's part of every global batch (DDP).
    """

    def __init__(
        self,
        x: np.ndarray,
        labels: np.ndarray | None,
        ids: np.ndarray,
        teacher: torch.Tensor | SparseTargets,
        params: np.ndarray,
        plan: ViewPlan,
        k: int,
        batch_size: int,
        seed: int = 0,
        rank: tuple[int, int] = (0, 1),
    ) -> None:
        self.x, self.labels, self.ids = x, labels, ids
        self.teacher, self.params, self.plan = teacher, params, plan
        self.k, self.batch_size, self.seed, self.rank = k, batch_size, seed, rank
        n = self.num_rows
        self.spans = None if rank[1] == 1 else batch_spans(n, batch_size, rank[0], rank[1])

    @property
    def num_rows(self) -> int:
        return int(self.x.shape[0]) * max(1, self.k)

    def __len__(self) -> int:
        if self.spans is not None:
            return len(self.spans)
        return math.ceil(self.num_rows / self.batch_size)

    def epoch(self, epoch: int, with_rows: bool = False) -> Iterator[tuple]:
        """Yield ``(x, teacher, labels)`` batches; the inputs are the chosen views, replayed."""
        samples, rows = epoch_rows(self.plan, self.seed, epoch, self.ids, self.k)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(rows))
        spans = self.spans or [
            (s, s + self.batch_size) for s in range(0, len(rows), self.batch_size)
        ]
        for lo, hi in spans:
            idx = order[lo:hi]
            s, r = samples[idx], rows[idx]
            xb = replay(self.plan, self.x[s], self.params[r], self.k)
            batch = (
                torch.from_numpy(xb),
                self.teacher[torch.from_numpy(r)],
                None if self.labels is None else torch.from_numpy(self.labels[s]),
            )
            yield (*batch, s) if with_rows else batch


def epoch_rows(
    plan: ViewPlan, seed: int, epoch: int, ids: np.ndarray, k: int, first: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's (sample positions, cache rows), ``max(1, k)`` per sample, ordered by sample.

    Args:
        first: position of ``ids[0]`` among the served samples (a shard's first sample).
    """
    n = len(ids)
    chosen = (
        np.zeros((n, 1), np.int64)
        if k == 0
        else pick_views(seed, epoch, ids, plan.views, k).astype(np.int64)
    )
    samples = np.repeat(np.arange(first, first + n), chosen.shape[1])
    rows = samples * plan.views + chosen.reshape(-1)
    return samples, rows


def replay(plan: ViewPlan, x: np.ndarray, params: np.ndarray, k: int) -> np.ndarray:
    """The views' inputs: stored ``params`` replayed on originals ``x`` (k = 0: the originals,
    what the identity view replays to)."""
    if k == 0:
        return np.asarray(x, dtype=np.float32)
    return plan.augment_pipeline.apply(x, params)


class ViewStreamingSource(StreamingCacheSource):
    """A streaming cache source over a view cache: each shard read serves the epoch's chosen views
    of its samples, replayed (in the prefetch thread), with their own rows."""

    def __init__(self, *args: object, plan: ViewPlan, k: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.plan, self.k, self._epoch = plan, k, 0
        self.rows *= max(1, k)

    def epoch(self, epoch: int, with_rows: bool = False, part: tuple[int, int] = (0, 1)):
        self._epoch = epoch
        yield from super().epoch(epoch, with_rows=with_rows, part=part)

    def _read(self, shard: int) -> tuple:
        start, stop = self.cache.shard_bounds(shard)
        ids = self.cache.read_ids(shard)
        teacher = shard_targets(self.cache, shard, self.members, self.method, self.temperature)
        labels = self.cache.read_labels(shard, truth=self.truth)
        params = self.cache.read_view_params(shard)
        samples, rows = epoch_rows(self.plan, self.seed, self._epoch, ids, self.k)
        xb = replay(self.plan, self.x[start + samples], params[rows], self.k)
        return (
            xb,
            teacher[torch.from_numpy(rows)],
            None if labels is None else labels[samples],
            start + samples,
        )


def view_source(
    cache: LogitCache,
    x: np.ndarray,
    use: ViewUse,
    members: list[int],
    method: str,
    temperature: float,
    batch_size: int,
    budget: int,
    seed: int,
    shards: np.ndarray,
    truth: np.ndarray | None = None,
    rank: tuple[int, int] = (0, 1),
) -> tuple[ViewMemorySource | ViewStreamingSource, LoaderPlan]:
    """The batch source of a run on a view cache: in memory when its rows fit ``budget``.

    In memory holds every view's combined targets and parameters (N x V rows) and the original
    inputs; views are replayed per batch. Streaming reads whole shards and replays the epoch's
    chosen views as it reads them.
    """
    plan = use.plan
    assert plan is not None
    v, k = plan.views, max(1, use.per_epoch)
    samples = sum(int(np.subtract(*cache.shard_bounds(int(s))[::-1])) for s in shards)
    target = target_bytes_per_row(cache, members)
    width = len(cache.header.view_params or ())
    in_bytes = int(np.prod(x.shape[1:])) * x.dtype.itemsize
    memory = samples * (in_bytes + v * (target + 4 * width))
    if memory <= budget:
        parts = [shard_targets(cache, int(s), members, method, temperature) for s in shards]
        teacher = (
            SparseTargets.cat(parts) if isinstance(parts[0], SparseTargets) else torch.cat(parts)
        )
        pos = np.concatenate([np.arange(*cache.shard_bounds(int(s))) for s in shards])
        labels = None
        if cache.labeled:
            labels = np.concatenate([cache.read_labels(int(s), truth=truth) for s in shards])
        params = np.concatenate([cache.read_view_params(int(s)) for s in shards])
        ids = np.concatenate([cache.read_ids(int(s)) for s in shards])
        lp = LoaderPlan("memory", samples * k, len(shards), len(shards), memory, budget)
        source = ViewMemorySource(
            x[pos], labels, ids, teacher, params, plan, use.per_epoch, batch_size, seed, rank
        )
        return source, lp
    if rank[1] > 1 and k > 1:
        raise ConfigError(
            [
                f"--views-per-epoch {k} under torchrun needs the in-memory loader; raise "
                f"--memory-budget to {memory} bytes or more, or use --views-per-epoch 1"
            ]
        )
    per_sample = 2 * k * (target + 4 * int(np.prod(x.shape[1:])) + 8) + v * (target + 4 * width)
    prefetch = (PREFETCH_SHARDS + 1) * cache.rows_per_shard * per_sample
    buffer = max(1, (budget - prefetch) // max(1, per_sample * cache.rows_per_shard))
    lp = LoaderPlan("stream", samples * k, len(shards), int(buffer), memory, budget)
    source = ViewStreamingSource(
        cache,
        x,
        members,
        method,
        temperature,
        shards,
        batch_size,
        int(buffer),
        seed,
        truth=truth,
        rank=rank,
        plan=plan,
        k=use.per_epoch,
    )
    return source, lp


def shard_inputs(
    cache: LogitCache, plan: ViewPlan | None, shard: int, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray | slice]:
    """A shard's inputs matched to its cached rows, for measuring agreement: view 0 of every
    sample replayed (a plain cache: the inputs as they are) and the rows to compare with."""
    if plan is None:
        return x, slice(None)
    rows = np.arange(len(x)) * plan.views
    return replay(plan, x, cache.read_view_params(shard)[rows], 1), rows
