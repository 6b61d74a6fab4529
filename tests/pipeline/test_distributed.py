"""How an epoch is shared by the ranks of a torchrun job (pipeline.distributed and the two batch
sources' ``rank=``): every row exactly once per epoch across the ranks, the same number of steps
on every rank, and on one process exactly the old batches. (The real torchrun runs are in
tests/stages/test_torchrun.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.read import LogitCache
from pipeline.datasets import load_dataset
from pipeline.distributed import (
    SINGLE,
    Ranks,
    balanced,
    batch_spans,
    launched,
    refuse_torchrun,
    row_share,
    shard_spans,
    stream_steps,
)
from pipeline.errors import DistributedError
from pipeline.training.loader import StreamingCacheSource, cache_source
from pipeline.training.sources import InMemorySource

CASES = [(600, 32, 2), (601, 100, 2), (600, 17, 7), (5, 1, 4), (7, 3, 3), (64, 64, 1), (3, 8, 3)]


@pytest.mark.parametrize(("n", "batch", "world"), CASES)
def test_batch_spans_use_every_position_once_with_equal_steps(
    n: int, batch: int, world: int
) -> None:
    shares = [batch_spans(n, batch, k, world) for k in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of steps on every rank
    used = np.concatenate([np.arange(a, b) for s in shares for a, b in s])
    assert np.array_equal(np.sort(used), np.arange(n))
    assert all(b > a for s in shares for a, b in s)  # no empty batch
    # Step j of all ranks together is global batch j: consecutive positions of the order.
    for j in range(len(shares[0])):
        step = [s[j] for s in shares]
        assert all(step[k][1] == step[k + 1][0] for k in range(world - 1))


def test_a_last_global_batch_smaller_than_the_world_is_merged() -> None:
    # 601 rows, 2 x 100 per step: 3 full global batches and 1 row, folded into the third.
    assert batch_spans(601, 100, 0, 2) == [(0, 100), (200, 300), (400, 501)]
    assert batch_spans(601, 100, 1, 2) == [(100, 200), (300, 400), (501, 601)]


def test_fewer_rows_than_ranks_is_one_clear_error() -> None:
    with pytest.raises(DistributedError, match="3 training rows cannot be shared by 4 processes"):
        batch_spans(3, 8, 0, 4)
    with pytest.raises(DistributedError, match="cannot be shared"):
        stream_steps(3, 8, 4)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shard_spans_split_rows_in_order_contiguously(world: int) -> None:
    sizes = [64] * 9 + [24]  # 600 rows, a short last shard
    rows = []
    for k in range(world):
        got = []
        for i, lo, hi in shard_spans(sizes, k, world):
            start = sum(sizes[:i])
            got += list(range(start + lo, start + hi))
        assert got == list(range(*row_share(600, k, world)))  # contiguous, in the order
        rows += got
    assert sorted(rows) == list(range(600))


def test_balanced_folds_extra_batches_into_the_last() -> None:
    batches = [(torch.arange(3 * i, 3 * i + 3), None, np.arange(i, i + 1)) for i in range(4)]
    out = list(balanced(iter(batches), 3))
    assert len(out) == 3
    assert out[2][0].tolist() == [6, 7, 8, 9, 10, 11] and out[2][1] is None
    assert out[2][2].tolist() == [2, 3]
    assert len(list(balanced(iter(batches), 5))) == 4  # never invents batches


def test_in_memory_shares_are_the_single_process_global_batches() -> None:
    """Rank k's step-j rows, over the ranks, are exactly a single process's batch j at
    ``batch_size x world``: the DDP run trains on the same batches."""
    n, b, world = 203, 16, 3
    x = torch.arange(n).float().reshape(n, 1)
    y = torch.arange(n) % 5
    single = InMemorySource(x, y, batch_size=b * world, seed=7)
    ranks = [InMemorySource(x, y, batch_size=b, seed=7, rank=(k, world)) for k in range(world)]
    assert {len(r) for r in ranks} == {len(single)} and len(single) == 5
    for epoch in range(2):
        steps = list(zip(*(r.epoch(epoch, with_rows=True) for r in ranks), strict=True))
        for (xb, _, yb), step in zip(single.epoch(epoch), steps, strict=True):
            rows = np.concatenate([s[3] for s in step])
            assert rows.tolist() == xb[:, 0].long().tolist()
            assert torch.equal(torch.cat([s[2] for s in step]), yb)


def test_one_process_batches_are_unchanged() -> None:
    x = torch.arange(50).float().reshape(50, 1)
    a = list(InMemorySource(x, None, batch_size=8, seed=3).epoch(1))
    b = list(InMemorySource(x, None, batch_size=8, seed=3, rank=(0, 1)).epoch(1))
    assert len(a) == len(b) == 7
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))


def stream_source(cache: LogitCache, batch: int, rank: tuple[int, int]) -> StreamingCacheSource:
    data = load_dataset(cache.dataset.spec)
    return StreamingCacheSource(
        cache,
        data.x,
        [0, 1],
        "mean-probs",
        4.0,
        cache.done_shards(),
        batch,
        buffer_shards=2,
        seed=5,
        truth=data.y,
        rank=rank,
    )


@pytest.mark.parametrize(("batch", "world"), [(32, 2), (17, 7), (50, 3)])
def test_streamed_shares_use_every_row_once_with_equal_steps(
    cache_path: Path, batch: int, world: int
) -> None:
    """600 rows in 10 shards of 64 (the last one 24): shards do not split evenly over the ranks,
    rows do; 600 = 7 x 85 + 5 with batch 17 makes five ranks fold a one-row batch."""
    cache = LogitCache(cache_path)
    for epoch in range(2):
        rows = []
        for k in range(world):
            src = stream_source(cache, batch, (k, world))
            got = list(src.epoch(epoch, with_rows=True))
            assert len(got) == len(src) == stream_steps(600, batch, world)
            rows.append(np.concatenate([g[3] for g in got]))
            assert len(rows[-1]) in (600 // world, 600 // world + 1)
            for xb, tb, yb, r in got:  # each row's inputs, targets and labels stay together
                assert xb.shape[0] == tb.shape[0] == yb.shape[0] == len(r)
        everyone = np.concatenate(rows)
        assert np.array_equal(np.sort(everyone), np.arange(600)), epoch
    single = stream_source(cache, batch, (0, 1))
    whole = np.concatenate([g[3] for g in single.epoch(0, with_rows=True)])
    assert np.array_equal(np.sort(whole), np.arange(600))


def test_cache_source_passes_the_share_to_either_mode(cache_path: Path) -> None:
    cache = LogitCache(cache_path)
    data = load_dataset(cache.dataset.spec)
    common = (cache, data.x, [0, 1], "mean-probs", 4.0, 32)
    mem, plan = cache_source(*common, 1 << 30, rank=(1, 2))
    assert plan.mode == "memory" and mem.rank == (1, 2) and len(mem) == 10
    stream, plan = cache_source(*common, 1 << 20, rank=(1, 2))
    if plan.mode == "stream":  # 600 tiny rows may fit 1 MiB; the share is passed either way
        assert stream.rank == (1, 2)


def test_launch_variables() -> None:
    assert launched({}) is SINGLE
    assert launched({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is SINGLE
    assert launched({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(DistributedError, match="WORLD_SIZE=2 with RANK=2 is not a rank"):
        launched({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(DistributedError, match="not integers"):
        launched({"WORLD_SIZE": "two", "RANK": "0"})


def test_dask_commands_refuse_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cache.config import CacheConfig
    from pipeline.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert refuse_torchrun("sweep") == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="cache-logits runs under torchrun with WORLD_SIZE=2"):
        CacheConfig(teachers=["t"], out="c.zarr").validate()


def test_local_cluster_class_without_dask_cuda() -> None:
    """CPU work, or CUDA without dask-cuda installed (as here), keeps dask's LocalCluster."""
    from dask.distributed import LocalCluster

    from pipeline.cluster import local_cluster_class

    assert local_cluster_class(2, gpu=False) is LocalCluster
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        assert local_cluster_class(2, gpu=True) is LocalCluster
