"""Memory stays bounded by the loader's settings, not by the dataset: peak RSS of the real
``cache-logits`` and ``train-student`` on a folder 10x larger than the memory budget, against the
same commands on a folder of a few images (slow: thousands of PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.images import make_image_folder
from tests.helpers.process import kd, peak_rss

pytest.importorskip("PIL")
pytestmark = pytest.mark.slow

BUDGET = 1 << 20  # --memory-budget of train-student: 1 MiB, the least it takes
ALLOWANCE = 100 << 20  # a fixed allowance: allocator arenas, torch's per-batch buffers, zarr caches


def run_both(root: Path, per_class: int, teacher: Path) -> tuple[int, int]:
    """Peak RSS of cache-logits and of a streaming train-student on a folder of ``per_class``
    images per class (3 classes, 32 x 32 RGB)."""
    imgs = make_image_folder(root / "imgs", {"train": per_class}, seed=1)
    spec = f"folder:{imgs}:train"
    cache = root / "c.zarr"
    common = ["--loader-workers", "2", "--device", "cpu"]
    code, out, cache_rss = peak_rss(
        "cache-logits",
        "--teacher",
        str(teacher),
        "--dataset",
        spec,
        "--out",
        str(cache),
        "--rows-per-shard",
        "128",
        "--quiet",
        *common,
    )
    assert code == 0, out
    run = root / "run"
    code, out, train_rss = peak_rss(
        "train-student",
        "--cache",
        str(cache),
        "--student",
        "mlp:16",
        "--epochs",
        "1",
        "--memory-budget",
        str(BUDGET),
        "--eval",
        "",
        "--out",
        str(run),
        "--quiet",
        *common,
    )
    assert code == 0, out
    mode = json.loads((run / "metrics.json").read_text())["cache"]["loader"]["mode"]
    assert mode == ("stream" if per_class * 3 * 32 * 32 * 3 > BUDGET else "memory")
    return cache_rss, train_rss


def test_peak_memory_does_not_grow_with_the_folder(tmp_path: Path) -> None:
    imgs = make_image_folder(tmp_path / "teach", {"train": 20}, seed=0)
    r = kd(
        *("train-teacher", "--dataset", f"folder:{imgs}:train", "--model", "mlp:16"),
        *("--members", "1", "--epochs", "1", "--jitter", "0", "--eval", ""),
        *("--out", str(tmp_path / "teacher"), "--device", "cpu"),
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    teacher = tmp_path / "teacher"
    small = run_both(tmp_path / "small", 20, teacher)  # 60 images: 0.2 MiB decoded
    big = run_both(tmp_path / "big", 1200, teacher)  # 3,600 images: 10.5 MiB, 10x the budget
    growth = [b - s for s, b in zip(small, big, strict=True)]
    print(
        f"peak RSS cache-logits {small[0] >> 20} -> {big[0] >> 20} MiB, train-student "
        f"{small[1] >> 20} -> {big[1] >> 20} MiB (budget {BUDGET >> 10} KiB)"
    )
    assert all(g <= BUDGET + ALLOWANCE for g in growth), growth
