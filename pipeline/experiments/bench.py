"""``kd-pipeline bench``: what the cache buys, as ratios measured side by side in one run.

Each figure is the median of ``repeats`` timed runs after one warm-up, on the same data and machine,
printed P1 to P5 with its goal and whether it is met. A figure whose repeats differ by more than
25 % of their median, or a load average above half the cores before the start, is flagged: on a
shared machine the ratios then measure the other jobs.

- P1  stage-two epoch from the cache / the same student's epoch with plain cross-entropy
      (goal <= 1.05)
- P2  a sweep of K settings from the cache (``cache-logits`` once + the sweep) / the same K settings
      with online KD (teacher forward each batch), both through :func:`pipeline.sweep.run_sweep` in
      this process, next to the ideal (teacher once + K student) / K (student + teacher) from the
      measured parts (goal <= 1.1 x ideal)
- P3  ``cache-logits`` wall time / the teachers' inference alone over the same rows, both including
      loading the data and the checkpoints (goal <= 1.05); also on a folder of 5,000 PNG files
      decoded by DataLoader workers on both sides
- P4  streaming loader throughput (shuffled shards, whole-shard reads on several threads, members
      combined at T, batches) / the codec limit: the same whole shards read and decoded (zstd +
      crc32c) on every core with nothing else (goal >= 0.8); a raw .npy read of the same bytes is
      shown for information; peak RSS growth while streaming a
      cache 10x larger than the memory budget (goal <= budget + 300 MiB), measured in a child
      process
- P5  bytes on disk per sample per member vs raw float32 (reported); and per storage kind
      (dense, topk:20, sampled:12) at C = 10, 1,000 and 32,000 from synthetic logits (reported)
- P6  a loader epoch from a topk:20 (and a sampled:12) cache / the same epoch from the dense cache,
      1000 classes, the same teachers and rows (goal <= 1.1)

Teachers are the paper's shapes (3 x MLP 1200-1200 on 784 inputs) with random weights: inference
cost does not depend on training, and the bench must not need a trained model. A 1000-class variant
shows a bigger payload.

Here: the scales, the config and the run (:func:`run_bench`); the figures are measured in
:mod:`~pipeline.experiments.bench_figures` with :mod:`~pipeline.experiments.bench_timing`, and
judged and printed by :mod:`~pipeline.experiments.bench_report`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.config import CacheConfig
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from pipeline.checkpoints import load_checkpoint
from pipeline.datasets import load_dataset
from pipeline.devices import describe_device, resolve_device
from pipeline.errors import ConfigError
from pipeline.experiments.bench_figures import p1, p2, p3_folder, p4, p4_rss, p6
from pipeline.experiments.bench_report import bench_warnings, format_table, verdict
from pipeline.experiments.bench_timing import (
    MEMBERS,
    TEACHER,
    load_average,
    machine_info,
    make_teachers,
    median_time,
)
from pipeline.metrics import predict_logits
from pipeline.options import option
from pipeline.registry import Registry
from pipeline.step_options import device_option

# rows of the transfer set, repetitions, student epochs timed per repetition
SCALES: Registry[dict] = Registry("bench_scales", "scale", lambda message: ConfigError([message]))
SCALES.register("small", "10,000 rows, 3 repetitions", {"rows": 10_000, "repeats": 3})
SCALES.register("medium", "60,000 rows, 3 repetitions", {"rows": 60_000, "repeats": 3})
SCALES.register("large", "60,000 rows, 5 repetitions", {"rows": 60_000, "repeats": 5})


@dataclass
class BenchConfig:
    """``bench``: which scale to measure, where, and where to write the figures."""

    scale: str = option(
        "small",
        choices=SCALES,
        help="small: 10k rows (about two minutes on 2 CPU cores); medium/large: 60k rows.",
    )
    device: str = device_option()
    out: str | None = option(None, help="Write every figure, with the machine, to this JSON file.")


def run_bench(
    scale: str = "small",
    device_name: str = "auto",
    out: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every measurement; print a table; return (and optionally write) all figures."""
    cfg = SCALES[scale]
    device = resolve_device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps = cfg["repeats"]
    data = load_dataset(f"fashion-mnist:train:count={cfg['rows']}:seed=0")
    results: dict = {
        "scale": scale,
        "rows": len(data),
        "machine": machine_info(device),
        "figures": {},
    }
    results["machine"]["load_before"] = load_average()
    fig = results["figures"]
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        root = Path(tmp)
        _measure(root, data, 10, device, device_name, reps, sync, fig, log)
        # The 1000-class case runs on the same inputs without labels (an unlabeled transfer set).
        np.savez(root / "unlabeled.npz", x_train=data.x)
        unlabeled = load_dataset(f"npz:{root / 'unlabeled.npz'}:train")
        _measure(root, unlabeled, 1000, device, device_name, reps, sync, fig, log)
    with tempfile.TemporaryDirectory(prefix="kd-bench-folder-") as tmp:
        fig["P3 folder"] = p3_folder(Path(tmp), device, device_name, reps, log)
    fig["P4 rss"] = p4_rss()
    results["machine"]["load_after"] = load_average()
    results["warnings"] = bench_warnings(results)
    for f in fig.values():
        f["verdict"] = verdict(f)
    log(format_table(results))
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
        log(f"wrote {out}")
    return results


def _measure(
    root: Path,
    data,
    classes: int,
    device: torch.device,
    device_name: str,
    reps: int,
    sync: Callable[[], None],
    fig: dict,
    log: Callable[[str], None],
) -> None:
    """P3, P5, P4 (and P1 for 10 classes) for teachers with ``classes`` outputs."""
    label = f"{classes} classes"
    log(f"[{label}] teachers {MEMBERS} x {TEACHER}, {len(data)} rows, {describe_device(device)}")
    paths = make_teachers(
        root,
        {"spec": data.spec, "fingerprint": data.fingerprint},
        classes,
        data.sample_shape,
        data.input_stats,
    )
    batch = 1024

    def infer() -> None:
        # What running the teachers alone costs a user: load the data and the checkpoints, run every
        # member. The cache's overhead is then exactly its own work (identity, schema, compression,
        # writes, completion).
        x = load_dataset(data.spec).x
        for p in paths:
            predict_logits(load_checkpoint(p, device).model, x, device, batch)

    counter = iter(range(10_000))

    def cache() -> None:
        where = root / f"cache{classes}-{next(counter)}"
        build_cache(
            CacheConfig(
                teachers=paths,
                dataset=data.spec,
                out=str(where),
                batch_size=batch,
                device=device_name,
                command="bench",
            ),
            log=lambda s: None,
            progress=False,
        )

    t_inf, inf_all = median_time(infer, reps, sync)
    t_cache, cache_all = median_time(cache, reps, sync)
    fig[f"P3 {label}"] = {
        "cache_logits_s": t_cache,
        # The absolute rate too: a ratio hides a change that slows inference and caching alike
        # (the allocator's page faults cost both).
        "cache_rows_per_s": len(data) / t_cache,
        "inference_only_s": t_inf,
        "ratio": t_cache / t_inf,
        "goal": "<= 1.05",
        "runs": {"cache": cache_all, "inference": inf_all},
    }
    kept = root / f"cache{classes}-0"
    ci = LogitCache(kept).info()
    fig[f"P5 {label}"] = {
        "bytes_per_sample_per_member": ci.size_on_disk / (len(data) * MEMBERS),
        "raw_float32": classes * 4,
        "ratio": ci.size_on_disk / ci.raw_size,
    }
    fig[f"P4 {label}"] = p4(kept, data.x, reps)
    if classes == 1000:
        fig["P6 1000 classes"] = p6(kept, paths, data, batch, device_name, reps)
    if classes == 10:
        fig["P1"] = p1(LogitCache(kept), data, device, reps, sync)
        fig["P2"] = p2(root, kept, paths, data, t_cache, t_inf, device_name, reps, sync)
