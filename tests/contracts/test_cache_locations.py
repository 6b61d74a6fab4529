"""The contract every cache location keeps: a directory, a ``.zarr.zip`` bundle and an ``s3://``
URL (moto's S3 server on 127.0.0.1, the ``s3_server`` fixture).

For each location (a row of :data:`LOCATIONS`):

1. a small cache placed there (by the writer; a bundle by ``cache pack``, the one way to make
   one) reads back equal through the reader (``LogitCache``) and raw through zarr;
2. ``cache verify`` finds it clean;
3. ``cache copy`` to every location (itself included, under a new name) makes an equal cache that
   verifies;
4. a copy into a location that holds another cache is refused before anything is written, and
   the other cache is left as it was.

A new kind of location is a new row: give how to name a fresh one and how to place a cache there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.copying import copy_cache, pack_cache
from pipeline.cache.read import LogitCache
from pipeline.cache.verify import verify_cache
from pipeline.errors import CacheError
from tests.helpers.caches import raw_arrays, write_logits_cache
from tests.helpers.s3 import s3_url

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]

M, N, C, RPS = 2, 10, 4, 4  # members, rows, classes, rows per shard: 3 shards, the last short
LABELS = np.arange(N) % C


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Location:
    """How the contract reaches one kind of location.

    Attributes:
        name: the location kind, as test ids show it.
        new: ``new(tmp, name)`` a fresh, unused location of this kind.
        needs: the fixtures the location needs (the S3 server).
    """

    name: str
    new: Callable[[Path, str], str]
    needs: tuple[str, ...] = ()

    def place(self, tmp: Path, name: str, member_logits: np.ndarray) -> str:
        """A complete cache of ``member_logits`` (M, N, C) at a fresh location of this kind."""
        where = self.new(tmp, name)
        if where.endswith(".zarr.zip"):  # the writer writes no bundles: `cache pack` makes them
            src, _ = write_logits_cache(tmp / f"{name}-src", member_logits, LABELS, RPS)
            pack_cache(src, where, progress=False, log=quiet)
        else:
            write_logits_cache(tmp / name, member_logits, LABELS, RPS, out=where)
        return where


LOCATIONS = [
    Location("dir", lambda tmp, name: str(tmp / f"{name}.zarr")),
    Location("zip", lambda tmp, name: str(tmp / f"{name}.zarr.zip")),
    Location(
        "s3", lambda tmp, name: s3_url(f"contract/{tmp.name}/{name}.zarr"), needs=("s3_server",)
    ),
]


def logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(M, N, C)).astype(np.float32)


def ready(request: pytest.FixtureRequest, *locations: Location) -> None:
    for loc in locations:
        for name in loc.needs:
            request.getfixturevalue(name)


def stored_logits(where: str) -> np.ndarray:
    """(M, N, C) every member's logits as the reader serves them."""
    cache = LogitCache(where)
    return np.concatenate([cache.read_logits(s) for s in range(cache.n_shards)], axis=1)


@pytest.fixture(params=LOCATIONS, ids=[loc.name for loc in LOCATIONS])
def location(request: pytest.FixtureRequest) -> Location:
    ready(request, request.param)
    return request.param


PAIRS = list(itertools.product(LOCATIONS, LOCATIONS))


@pytest.fixture(params=PAIRS, ids=[f"{a.name}-to-{b.name}" for a, b in PAIRS])
def pair(request: pytest.FixtureRequest) -> tuple[Location, Location]:
    ready(request, *request.param)
    return request.param


class TestCacheLocationContract:
    """What every cache location keeps (see the module docstring)."""

    def test_a_cache_placed_there_reads_back_equal(
        self, location: Location, tmp_path: Path
    ) -> None:
        given = logits(1)
        where = location.place(tmp_path, "c", given)
        cache = LogitCache(where)
        assert (cache.complete, cache.n, cache.num_classes, cache.n_shards) == (True, N, C, 3)
        assert np.array_equal(stored_logits(where), given)
        raw = raw_arrays(where)
        assert np.array_equal(raw["ids"], np.arange(N))
        assert np.array_equal(raw["labels"], LABELS)
        for m in range(M):
            assert np.array_equal(raw[f"members/{m}/logits"], given[m])
            assert raw[f"members/{m}/done"].all()

    def test_verify_finds_it_clean(self, location: Location, tmp_path: Path) -> None:
        report = verify_cache(location.place(tmp_path, "c", logits(2)))
        assert report.ok, report.format()

    def test_a_copy_to_every_location_is_equal_and_verifies(
        self, pair: tuple[Location, Location], tmp_path: Path
    ) -> None:
        src_kind, dst_kind = pair
        given = logits(3)
        src = src_kind.place(tmp_path, "src", given)
        dst = dst_kind.new(tmp_path, "dst")
        result = copy_cache(src, dst, progress=False, log=quiet)
        assert result.report.ok, result.report.format()
        assert verify_cache(dst).ok
        assert np.array_equal(stored_logits(dst), given)
        want, got = raw_arrays(src), raw_arrays(dst)
        assert want.keys() == got.keys()
        for name in want:
            assert np.array_equal(want[name], got[name]), name

    def test_a_copy_onto_another_cache_is_refused(
        self, pair: tuple[Location, Location], tmp_path: Path
    ) -> None:
        src_kind, dst_kind = pair
        src = src_kind.place(tmp_path, "src", logits(4))
        other = logits(5)
        dst = dst_kind.place(tmp_path, "dst", other)
        with pytest.raises(CacheError, match="already holds|exists"):
            copy_cache(src, dst, progress=False, log=quiet)
        assert np.array_equal(stored_logits(dst), other)
        assert verify_cache(dst).ok
