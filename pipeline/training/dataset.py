"""A torch ``IterableDataset`` over a logit cache, for training loops other than kd-pipeline's.

:class:`CacheDataset` serves a cache's transfer set joined with its soft targets, one item per
sample, for any cache ``cache-logits`` writes: dense, ``topk:K`` or ``sampled:S`` members, view
caches (stored views replayed with their own rows) and token caches (a sequence's ids with one
row of targets per position). Items::

    {"inputs": x, "targets": t, "labels": y}   # "labels" only when the cache has labels

- ``inputs``: the sample as the transfer set holds it, raw (uint8 pixels or float32; token
  caches: (P,) int64 ids). Normalising is the model's job (``CacheDataset.input_stats`` are the
  inputs' mean and std, as kd-pipeline's own students use them).
- ``targets``: dense caches: (C,) float32 logits ``v`` whose ``softmax(v / T)`` is the ensemble's
  distribution at the dataset's temperature (members combined); token caches (P, C). Sparse
  caches: a one-row :class:`~pipeline.training.targets.SparseTargets` (classes kept or drawn,
  log-probabilities at T).
- ``labels``: () int64 (token caches: (P,) next tokens, negative where a position has none).

:func:`collate_soft_targets` stacks items into a batch dict of the same keys ((B, ...) tensors,
or one :class:`SparseTargets` of B rows), and :func:`pipeline.training.functional.kd_loss` takes
a batch's ``targets`` as they are.

It is stage two's loader underneath (:func:`pipeline.training.loader.cache_source`,
:func:`pipeline.training.views.view_source`, :func:`pipeline.training.sequence.token_source`):
the same checks of the cache against its transfer set, the same member combination, and the same
memory bound: when the combined targets and inputs exceed ``memory_budget`` bytes, whole shards
are streamed in a seeded shard order through a bounded shuffle buffer instead of being held.

Distributed data parallel: each rank serves a disjoint share of every epoch (rank and world size
from ``torch.distributed`` when it is initialised, or given), and every rank serves the same
number of items (``len(dataset)``, at most a few fewer than its share), so every rank takes the
same number of steps. Call :meth:`CacheDataset.set_epoch` before each epoch for a new order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.location import CacheLocation
from pipeline.cache.read import LogitCache
from pipeline.cache.transfer import load_transfer_set
from pipeline.checks import collect, one_of, positive
from pipeline.distributed import batch_spans
from pipeline.errors import CacheError, ConfigError, DistributedError
from pipeline.sequences.data import is_sequence
from pipeline.training.config import StudentConfig
from pipeline.training.loader import (
    StreamingCacheSource,
    cache_source,
    check_member_kinds,
    finished_shards,
)
from pipeline.training.losses import ENSEMBLE_METHODS
from pipeline.training.sequence import is_token_cache, token_source
from pipeline.training.soft_targets import soft_target_record
from pipeline.training.targets import SparseTargets
from pipeline.training.views import view_source, view_use

DEFAULT_BUDGET = 2 << 30  # train-student's --memory-budget default
BLOCK_ROWS = 256  # samples the underlying source gathers at a time (then served one by one)

Item = dict[str, Any]


def _ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world)``: the arguments, else torch.distributed's when initialised, else (0, 1).

    Raises:
        ConfigError: only one of the two given, or a rank outside the world.
    """
    if (rank is None) != (world_size is None):
        raise ConfigError(["give both rank= and world_size=, or neither (torch.distributed's)"])
    if rank is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    assert world_size is not None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            [f"rank={rank} with world_size={world_size}: expected 0 <= rank < world_size"]
        )
    return int(rank), int(world_size)


class CacheDataset(torch.utils.data.IterableDataset):
    """A cache's transfer set with its soft targets, one item per sample (see the module doc).

    Args:
        cache: the cache: a directory, ``NAME.zarr.zip``, ``s3://...`` or an open
            :class:`LogitCache`.
        temperature: T of the targets (the soft term's temperature): sparse members' probabilities
            and ``mean-probs`` ensembles depend on it.
        members: the cache's members to combine [default: all].
        ensemble: ``mean-probs`` (arithmetic mean of the members' distributions at T) or
            ``mean-logits`` (geometric mean).
        dataset: this machine's copy of the cache's transfer set (checked by fingerprint)
            [default: the spec the cache records].
        data_dir: where specs such as ``mnist:train`` find their files.
        views_per_epoch: view caches: stored views per sample per epoch (0: view 0 of each).
        memory_budget: bytes for targets and inputs; beyond them shards are streamed.
        seed: shard order, shuffles and the views picked (epoch e: the seed sequence [seed, e]).
        rank, world_size: this process's share under DDP [default: torch.distributed's].
        allow_partial: serve the finished shards of a cache still being written.
        storage_options: for ``s3://`` caches (endpoint, credentials, ...).
        block_rows: samples gathered per read of the underlying source.

    Raises:
        ConfigError: bad arguments or members; CacheError: a cache that does not match its
            transfer set, or has no finished shard.
    """

    def __init__(
        self,
        cache: str | Path | LogitCache,
        temperature: float = 1.0,
        members: list[int] | None = None,
        ensemble: str = "mean-probs",
        dataset: str | None = None,
        data_dir: str | None = None,
        views_per_epoch: int = 1,
        memory_budget: int = DEFAULT_BUDGET,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        allow_partial: bool = False,
        storage_options: dict | None = None,
        block_rows: int = BLOCK_ROWS,
    ) -> None:
        super().__init__()
        problems = collect(
            positive("temperature", temperature),
            one_of("ensemble", ensemble, ENSEMBLE_METHODS),
            positive("memory_budget", memory_budget),
            positive("block_rows", block_rows),
        )
        if problems:
            raise ConfigError(problems)
        if not isinstance(cache, LogitCache):
            cache = LogitCache(CacheLocation.parse(cache, storage_options), allow_partial)
        self.cache = cache
        self.rank, self.world_size = _ranks(rank, world_size)
        self.members = list(range(len(cache.members))) if members is None else list(members)
        bad = [m for m in self.members if not 0 <= m < len(cache.members)]
        if bad or not self.members:
            raise ConfigError(
                [
                    f"members {bad or '[]'} out of range: the cache has members "
                    f"0..{len(cache.members) - 1}"
                ]
            )
        check_member_kinds(cache, self.members, ensemble)
        self.temperature, self.ensemble, self.seed = float(temperature), ensemble, seed
        # What train-student records (storage, exactness at T, what the loss matches), and the
        # note it prints (a T whose sparse tails are interpolated) as a warning.
        self.soft_targets = soft_target_record(
            cache, self.members, StudentConfig(temperature=self.temperature)
        )
        if "note" in self.soft_targets:
            warnings.warn(self.soft_targets["note"], UserWarning, stacklevel=2)
        self.data = load_transfer_set(cache, dataset, data_dir)
        self.tokens = is_token_cache(cache)
        common: dict[str, Any] = {
            "members": self.members,
            "method": ensemble,
            "temperature": self.temperature,
            "batch_size": block_rows,
            "budget": memory_budget,
            "seed": seed,
            "shards": finished_shards(cache, self.members),
            "rank": (self.rank, self.world_size),
        }
        if self.tokens:
            if views_per_epoch != 1:  # refused, as train-student refuses it, never ignored
                raise ConfigError(
                    [
                        f"views_per_epoch={views_per_epoch}: {cache.location} is a token cache, "
                        "which holds no augmented views; leave views_per_epoch at 1"
                    ]
                )
            if not is_sequence(self.data):
                raise CacheError(f"{cache.location}: its transfer set is not a sequence dataset")
            self.source, self.plan = token_source(cache, self.data, **common)  # type: ignore[arg-type]
        else:
            # The same decision train-student makes for --views-per-epoch (refusals included).
            cfg = StudentConfig(cache=str(cache.location), views_per_epoch=views_per_epoch)
            use = view_use(cfg, cache)
            if use.replays:
                self.source, self.plan = view_source(
                    cache, self.data.x, use, truth=self.data.y, **common
                )
            else:
                self.source, self.plan = cache_source(
                    cache, self.data.x, truth=self.data.y, **common
                )
        self.epoch = 0
        self._len = self._served()

    # -------------------------------------------------------------------------------- facts
    @property
    def num_classes(self) -> int:
        """C: classes (token caches: the tokenizer's vocabulary)."""
        return int(self.cache.num_classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.cache.header.class_names)

    @property
    def input_stats(self) -> tuple[float, float]:
        """The inputs' (mean, std) the cache records (kd-pipeline's students normalise by them)."""
        return tuple(self.cache.dataset.input_stats)  # type: ignore[return-value]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.sample_shape)

    @property
    def labeled(self) -> bool:
        """Whether items carry ``labels`` (token caches: always, the next tokens)."""
        return bool(self.tokens or self.cache.labeled)

    def __len__(self) -> int:
        """Items this rank serves per epoch."""
        return self._len

    def _served(self) -> int:
        """Items per epoch on this rank: all of them on one process; under DDP every rank's
        count is the smallest share, so that all ranks take the same steps."""
        total = int(self.source.num_rows)
        if self.world_size == 1:
            return total
        spans = getattr(self.source, "spans", None)
        if spans is None:  # streamed: contiguous shares of the epoch (row_share)
            return total // self.world_size
        block = self.source.batch_size
        return min(
            sum(hi - lo for lo, hi in batch_spans(total, block, r, self.world_size))
            for r in range(self.world_size)
        )

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch``'s order (and views) on the next iteration."""
        self.epoch = int(epoch)

    def collate_fn(self, items: list[Item]) -> Item:
        """:func:`collate_soft_targets` (so ``DataLoader(ds, collate_fn=ds.collate_fn)``)."""
        return collate_soft_targets(items)

    def loader(self, batch_size: int, **kwargs: Any) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over this dataset with :func:`collate_soft_targets`.

        Raises:
            DistributedError: loader workers under DDP (see :meth:`_workers_refusal`).
        """
        if self.world_size > 1 and kwargs.get("num_workers", 0) > 1:
            raise DistributedError(self._workers_refusal())
        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, collate_fn=collate_soft_targets, **kwargs
        )

    def _workers_refusal(self) -> str:
        # Equal steps per rank are counted over the rank's whole share; split over loader workers
        # the share would be cut per worker and the ranks' counts could differ (a DDP hang).
        return (
            f"CacheDataset under DDP (world size {self.world_size}) serves equal steps per rank "
            "from one loader process; use num_workers=0 (the cache is read ahead on background "
            "threads already)"
        )

    # ------------------------------------------------------------------------------ serving
    def __iter__(self) -> Iterator[Item]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.world_size > 1 and workers > 1:
            raise DistributedError(self._workers_refusal())
        if isinstance(self.source, StreamingCacheSource):
            # Workers take disjoint slices of the epoch's shard order: each shard is read once.
            blocks = self.source.epoch(self.epoch, part=(worker, workers))
        else:
            blocks = (
                b for i, b in enumerate(self.source.epoch(self.epoch)) if i % workers == worker
            )
        left = self._len if self.world_size > 1 else None
        for x, t, y in blocks:
            for i in range(int(x.shape[0])):
                if left is not None:
                    if left == 0:
                        return
                    left -= 1
                item: Item = {"inputs": x[i], "targets": _row(t, i)}
                if y is not None:
                    item["labels"] = y[i]
                yield item


def _row(targets: torch.Tensor | SparseTargets, i: int) -> torch.Tensor | SparseTargets:
    """Sample ``i``'s targets: a dense row (C,) or (P, C), or a one-row :class:`SparseTargets`."""
    if isinstance(targets, SparseTargets):
        return targets[i : i + 1]
    return targets[i]


def collate_soft_targets(items: list[Item]) -> Item:
    """Stack :class:`CacheDataset` items into a batch.

    Returns:
        ``{"inputs": (B, *shape), "targets": (B, C) | (B, P, C) float32 or a SparseTargets of B
        rows, "labels": (B,) | (B, P) int64}`` (``labels`` when the items have them).
    """
    out: Item = {"inputs": torch.stack([torch.as_tensor(it["inputs"]) for it in items])}
    targets = [it["targets"] for it in items]
    if isinstance(targets[0], SparseTargets):
        out["targets"] = SparseTargets.cat(targets)
    else:
        out["targets"] = torch.stack(targets)
    if "labels" in items[0]:
        out["labels"] = torch.stack([torch.as_tensor(it["labels"]) for it in items]).long()
    return out


__all__ = ["CacheDataset", "collate_soft_targets"]
