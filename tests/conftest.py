"""Shared fixtures: tiny seeded data made in code, and a tiny real teacher ensemble trained
on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests must not depend on where they run or on this machine's thread count.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_image_task(
    n: int, seed: int, classes: int = 5, side: int = 8, noise: float = 0.9
) -> tuple:
    """A seeded image classification task with planted class prototypes.

    Returns:
        x (n, 1, side, side) float32 and y (n,) int64. Class c's images are prototype c plus
        Gaussian noise, so a small MLP learns it, imperfectly (noise keeps soft targets
        informative).
    """
    protos = (
        np.random.default_rng(1234).normal(0, 1, size=(classes, 1, side, side)).astype(np.float32)
    )
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = protos[y] + rng.normal(0, noise, size=(n, 1, side, side)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


def write_npz(
    path: Path,
    n_train: int = 600,
    n_test: int = 300,
    classes: int = 5,
    labeled: bool = True,
    seed: int = 0,
) -> Path:
    x_tr, y_tr = make_image_task(n_train, seed, classes)
    x_te, y_te = make_image_task(n_test, seed + 1, classes)
    arrays = {"x_train": x_tr, "x_test": x_te, "y_test": y_te, "num_classes": np.int64(classes)}
    if labeled:
        arrays["y_train"] = y_tr
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def npz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labeled synthetic dataset: npz:<path>:train (600 rows) and :test (300 rows), 5 classes,
    1x8x8.
    """
    return write_npz(tmp_path_factory.mktemp("data") / "task.npz")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, npz_path: Path) -> Path:
    """A real 2-member mlp:32 teacher ensemble trained on ``npz_path`` (seconds on a CPU)."""
    from pipeline.config import TeacherConfig
    from pipeline.training.loop import TrainConfig
    from pipeline.training.teacher import train_teacher

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
    from pipeline.cache.writer import build_cache
    from pipeline.config import CacheConfig

    out = tmp_path_factory.mktemp("cache") / "task.zarr"
    build_cache(
        CacheConfig(
            teachers=[str(teacher_dir)],
            dataset=f"npz:{npz_path}:train",
            out=str(out),
            rows_per_shard=64,
            device="cpu",
        ),
        log=lambda s: None,
        progress=False,
    )
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
    import numpy as np

    from pipeline.cache.create import create_cache
    from pipeline.cache.write import mark_complete, write_shard
    from pipeline.datasets import load_dataset

    count = [0]

    def make(
        member_logits, labels=None, rows_per_shard: int = 4, dtype: str = "float32", in_dim: int = 2
    ):
        member_logits = np.asarray(member_logits, dtype=np.float32)
        m, n, c = member_logits.shape
        count[0] += 1
        base = tmp_path / f"logits{count[0]}"
        x = np.random.default_rng(count[0]).normal(size=(n, in_dim)).astype(np.float32)
        arrays = {
            "x_train": x,
            "x_test": x,
            "num_classes": np.int64(c),
            "y_test": np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64),
        }
        if labels is not None:
            arrays["y_train"] = np.asarray(labels, np.int64)
        np.savez(base.with_suffix(".npz"), **arrays)
        spec = f"npz:{base.with_suffix('.npz')}:train"
        data = load_dataset(spec)
        members = [
            {
                "path": f"member-{i}.pt",
                "checkpoint_sha256": f"sha256:{i:064x}",
                "model_spec": "given",
                "num_classes": c,
            }
            for i in range(m)
        ]
        location = base.with_suffix(".zarr")
        group = create_cache(
            location,
            dataset=data.describe(),
            ids=data.ids,
            labels=data.y,
            num_classes=c,
            class_names=[str(i) for i in range(c)],
            members=members,
            dtype=dtype,
            rows_per_shard=rows_per_shard,
            command="tests",
        )
        for s in range(-(-n // rows_per_shard)):
            lo, hi = s * rows_per_shard, min(n, (s + 1) * rows_per_shard)
            for k in range(m):
                write_shard(group, k, s, member_logits[k, lo:hi], data.ids[lo:hi])
        mark_complete(location)
        return location, spec

    return make


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_BUCKET = "kd-team"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 at a free port for the session, with bucket
    ``kd-team``.

    The standard AWS variables point every client at it (botocore and s3fs honour
    ``AWS_ENDPOINT_URL``), so the code under test and CLI subprocesses find it the way a team's
    machines find their bucket. Yields the endpoint.
    """
    server_mod = pytest.importorskip("moto.server")
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise

    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "kd-test",
        "AWS_SECRET_ACCESS_KEY": "kd-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


# ----------------------------------------------------------------------- damaging a copy of a cache
def damaged(cache_path: Path, tmp_path: Path, kind: str, damage) -> Path:  # noqa: ANN001
    """A copy of ``cache_path`` with ``damage(copy_dir)`` applied, as a directory or a bundle.

    The bundle is zipped by hand: ``cache pack`` verifies what it packs, so it refuses damage.
    """
    import shutil
    import zipfile

    copy = tmp_path / "damaged.zarr"
    shutil.copytree(cache_path, copy)
    damage(copy)
    if kind == "dir":
        return copy
    bundle = tmp_path / "damaged.zarr.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        for f in sorted(copy.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(copy).as_posix())
    return bundle


def write(path: str, index: tuple | int, value: object):  # noqa: ANN201
    """A damage: store ``value`` at ``index`` of array ``path`` as a valid chunk."""
    import zarr

    def apply(root: Path) -> None:
        arr = zarr.open_group(str(root), mode="r+", use_consolidated=False)[path]
        arr.with_config({"write_empty_chunks": True})[index] = value

    return apply


def remove(key: str):  # noqa: ANN201
    """A damage: delete one stored object (a chunk) of the cache."""
    return lambda root: (root / key).unlink()


def edit_header(**changes: object):  # noqa: ANN201
    """A damage: change header fields (``num_classes`` also changes every member's)."""
    import zarr

    def apply(root: Path) -> None:
        g = zarr.open_group(str(root), mode="r+", use_consolidated=False)
        h = dict(g.attrs["kd_cache"])
        h.update(changes)
        if "num_classes" in changes:
            h["members"] = [{**m, "num_classes": changes["num_classes"]} for m in h["members"]]
        if "rows" in h and "n" in changes:  # format 2's row count follows n: the header stays
            h["rows"] = {**h["rows"], "n": changes["n"]}  # consistent, the arrays disagree
        g.attrs["kd_cache"] = h

    return apply


def relabel(root: Path) -> None:
    """A damage: sample 130's label rewritten to another valid class."""
    import zarr

    arr = zarr.open_group(str(root), mode="r+", use_consolidated=False)["labels"]
    arr[130] = (int(arr[130]) + 1) % 5
