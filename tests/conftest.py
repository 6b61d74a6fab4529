"""Shared fixtures (fixtures only: the plain helpers they use live in ``tests/helpers``): tiny
seeded data made in code, a tiny real teacher ensemble trained on it, caches of it, and a real
S3 API.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.caches import teacher_cache, write_logits_cache
from tests.helpers.data import write_npz
from tests.helpers.s3 import moto_server
from tests.helpers.writer import make, spec_of, train

# Tests must not depend on where they run or on this machine's thread count.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _no_allocator_settings_leak() -> Iterator[None]:
    """A CLI command run in this process (CliRunner) exports its allocator settings
    (``MALLOC_*_``, :mod:`pipeline.allocator`) for its children; later tests' subprocesses must
    not inherit them, or their memory measurements measure kept freed memory."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    yield
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        if k not in before:
            del os.environ[k]
    os.environ.update(before)


@pytest.fixture(scope="session")
def npz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labeled synthetic dataset: npz:<path>:train (600 rows) and :test (300 rows), 5 classes,
    1x8x8.
    """
    return write_npz(tmp_path_factory.mktemp("data") / "task.npz")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, npz_path: Path) -> Path:
    """A real 2-member mlp:32 teacher ensemble trained on ``npz_path`` (seconds on a CPU)."""
    from pipeline.training.config import TeacherConfig
    from pipeline.training.teacher import train_teacher
    from pipeline.training.train_config import TrainConfig

    out = tmp_path_factory.mktemp("teacher")
    train_teacher(
        TeacherConfig(
            dataset=f"npz:{npz_path}:train",
            model="mlp:32",
            input_dropout=0.0,
            dropout=0.0,
            jitter=0,
            members=2,
            eval=f"npz:{npz_path}:test",
            out=str(out),
            device="cpu",
            train=TrainConfig(epochs=5, batch_size=64, seed=0),
        ),
        log=lambda s: None,
    )
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (restored after): tiny models train far faster on a
    busy shared CPU. Module-scoped, so module fixtures that train can request it too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_path(tmp_path_factory: pytest.TempPathFactory, npz_path: Path, teacher_dir: Path) -> Path:
    """A complete float16 cache of ``teacher_dir`` (2 members) on npz:<npz_path>:train: 600 rows, 10
    shards of 64.

    Shared by many tests: never write to it (copy it first).
    """
    out = tmp_path_factory.mktemp("cache") / "task.zarr"
    teacher_cache(teacher_dir, f"npz:{npz_path}:train", out, rows_per_shard=64)
    return out


@pytest.fixture(scope="session")
def partial_cache_path(tmp_path_factory: pytest.TempPathFactory, cache_path: Path) -> Path:
    """``cache_path`` with shard 3 (rows 192..255) of member 0 not done and the header not complete,
    as an interrupted ``cache-logits`` leaves it. Never write to it."""
    import shutil

    import zarr

    dst = tmp_path_factory.mktemp("partial") / "partial.zarr"
    shutil.copytree(cache_path, dst)
    group = zarr.open_group(str(dst), mode="r+", use_consolidated=False)
    group["members/0/done"][3] = 0
    header = dict(group.attrs["kd_cache"])
    header["complete"] = False
    header["completed_at"] = None
    group.attrs["kd_cache"] = header  # attrs are stored as a whole: reassign the dict
    return dst


@pytest.fixture
def logits_cache(tmp_path: Path):
    """Factory: a complete cache holding given member logits (no teacher), on an npz dataset of
    matching rows.

    ``logits_cache(member_logits (M, N, C), labels=None, rows_per_shard=..., dtype="float32",
    in_dim=2)`` returns ``(cache location, transfer-set spec)``; the dataset's inputs are seeded
    random (N, in_dim) float32 and its test split is the same inputs (with the labels, or zeros).
    """
    count = [0]

    def make(
        member_logits, labels=None, rows_per_shard: int = 4, dtype: str = "float32", in_dim: int = 2
    ):
        count[0] += 1
        return write_logits_cache(
            tmp_path / f"logits{count[0]}",
            member_logits,
            labels,
            rows_per_shard=rows_per_shard,
            dtype=dtype,
            in_dim=in_dim,
            seed=count[0],
        )

    return make


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 at a free port for the session, with bucket
    ``kd-team``.

    The standard AWS variables point every client at it (botocore and s3fs honour
    ``AWS_ENDPOINT_URL``), so the code under test and CLI subprocesses find it the way a team's
    machines find their bucket. Yields the endpoint.
    """
    pytest.importorskip("moto.server")
    with moto_server() as endpoint:
        yield endpoint


# ------------------------------------------------------------------- the cache writer's tests
@pytest.fixture(scope="module")
def dataset_spec(npz_path: Path) -> str:
    """``npz:<npz_path>:train``."""
    return spec_of(npz_path)


@pytest.fixture(scope="module")
def complete_cache(
    tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, dataset_spec: str
) -> Path:
    """A complete float16 cache of the 2-member teacher over the 600-row set, 10 shards. Tests copy
    it."""
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    res = make(out, [teacher_dir], dataset_spec)
    assert res.status == "created"
    return out


@pytest.fixture
def cache_copy(complete_cache: Path, tmp_path: Path) -> Path:
    """A copy of ``complete_cache`` a test may damage."""
    import shutil

    dst = tmp_path / "copy.zarr"
    shutil.copytree(complete_cache, dst)
    return dst


@pytest.fixture(scope="module")
def new_teacher(tmp_path_factory: pytest.TempPathFactory, npz_path: Path) -> Path:
    """A separately trained mlp:16 teacher (seed 7) on the same data: a candidate new member."""
    return train(tmp_path_factory.mktemp("new-teacher"), npz_path, "mlp:16", seed=7) / "member-0.pt"
