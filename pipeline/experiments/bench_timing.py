"""What every ``bench`` figure is measured with: the median of timed repeats after a warm-up, the
machine's description and load, and the teachers (the paper's shapes with random weights).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.checkpoints import save_checkpoint
from pipeline.devices import describe_device
from pipeline.models import build_model

TEACHER = "mlp:1200,1200"
STUDENT = "mlp:800,800"
MEMBERS = 3


def median_time(
    fn: Callable[[], object], repeats: int, sync: Callable[[], None]
) -> tuple[float, list[float]]:
    fn()  # warm-up: allocator, thread pools, first-call overheads
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": describe_device(device),
        "python": platform.python_version(),
    }


def make_teachers(
    root: Path, data_meta: dict, num_classes: int, in_shape: tuple, stats: tuple
) -> list[str]:
    paths = []
    for i in range(MEMBERS):
        torch.manual_seed(100 + i)
        model = build_model(TEACHER, in_shape, num_classes, stats)
        meta = {
            "model_spec": TEACHER,
            "in_shape": list(in_shape),
            "num_classes": num_classes,
            "class_names": [str(c) for c in range(num_classes)],
            "dataset": data_meta,
            "metrics": None,
        }
        paths.append(str(save_checkpoint(root / f"c{num_classes}" / f"member-{i}.pt", model, meta)))
    return paths


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
