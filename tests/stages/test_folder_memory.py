"""Memory stays bounded by the loader's settings, not by the dataset: peak RSS of the real
``cache-logits`` and ``train-student`` on a folder 10x larger than the memory budget, against the
same commands on a folder of a few images (slow: thousands of PNG files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.image_folders import make_image_folder

pytest.importorskip("PIL")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUDGET = 1 << 20  # --memory-budget of train-student: 1 MiB, the least it takes
ALLOWANCE = 100 << 20  # a fixed allowance: allocator arenas, torch's per-batch buffers, zarr caches

# Runs one CLI command in this process and prints its own peak RSS (DataLoader workers are other
# processes: what grows with the data here is the main process's buffers).
RUN = """
import json, resource, sys
from stages.cli import main
rc = 1
try:
    rc = main(sys.argv[1:], standalone_mode=False) or 0
finally:
    print("PEAK_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(rc)
"""


def peak_rss(*args: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", RUN, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return int(r.stdout.rsplit("PEAK_RSS", 1)[1].split()[0])


def run_both(root: Path, per_class: int, teacher: Path) -> tuple[int, int]:
    """Peak RSS of cache-logits and of a streaming train-student on a folder of ``per_class``
    images per class (3 classes, 32 x 32 RGB)."""
    imgs = make_image_folder(root / "imgs", {"train": per_class}, seed=1)
    spec = f"folder:{imgs}:train"
    cache = root / "c.zarr"
    common = ["--loader-workers", "2", "--device", "cpu"]
    cache_rss = peak_rss(
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
    run = root / "run"
    train_rss = peak_rss(
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
    mode = json.loads((run / "metrics.json").read_text())["cache"]["loader"]["mode"]
    assert mode == ("stream" if per_class * 3 * 32 * 32 * 3 > BUDGET else "memory")
    return cache_rss, train_rss


def test_peak_memory_does_not_grow_with_the_folder(tmp_path: Path) -> None:
    imgs = make_image_folder(tmp_path / "teach", {"train": 20}, seed=0)
    r = subprocess.run(
        [sys.executable, "-m", "stages.cli", "train-teacher", "--dataset", f"folder:{imgs}:train"]
        + ["--model", "mlp:16", "--members", "1", "--epochs", "1", "--jitter", "0", "--eval", ""]
        + ["--out", str(tmp_path / "teacher"), "--device", "cpu"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
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
