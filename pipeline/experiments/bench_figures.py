"""The ``bench`` figures measured one by one: P1 (an epoch from the cache / a cross-entropy epoch),
P2 (a sweep from the cache / online KD), P3 on a folder of PNG files, P4 (loader throughput / the
codec limit; peak RSS growth, in a child process) and P6 (sparse caches / the dense one). What
each measures and its goal: :mod:`pipeline.experiments.bench`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.config import CacheConfig
from pipeline.cache.create import create_cache
from pipeline.cache.layout import shard_bounds
from pipeline.cache.read import LogitCache
from pipeline.cache.write import mark_complete, write_shard
from pipeline.cache.writer import build_cache
from pipeline.checkpoints import load_checkpoint
from pipeline.data.fingerprint import fingerprint_arrays
from pipeline.datasets import load_dataset
from pipeline.devices import resolve_device
from pipeline.experiments.bench_timing import MEMBERS, STUDENT, TEACHER, make_teachers, median_time
from pipeline.experiments.config import SweepConfig
from pipeline.experiments.storage import byte_table as storage_byte_table
from pipeline.experiments.sweep import run_sweep
from pipeline.files import slug
from pipeline.metrics import predict_logits
from pipeline.models import build_model
from pipeline.training.config import StudentConfig
from pipeline.training.loader import StreamingCacheSource, cache_source
from pipeline.training.loop import fit
from pipeline.training.losses import DistillationLoss
from pipeline.training.sources import InMemorySource
from pipeline.training.train_config import TrainConfig


def p1(cache: LogitCache, data, device: torch.device, reps: int, sync: Callable[[], None]) -> dict:
    tcfg = TrainConfig(epochs=1, batch_size=128, seed=0)
    kd_source, plan = cache_source(
        cache, data.x, list(range(MEMBERS)), "mean-probs", 4.0, 128, 4 << 30
    )
    ce_source = InMemorySource(data.x, data.y, batch_size=128, seed=0)
    kd_loss, ce_loss = DistillationLoss(4.0, 0.9), DistillationLoss(1.0, 0.0)

    def epoch(source: InMemorySource, loss: DistillationLoss) -> Callable[[], None]:
        def go() -> None:
            torch.manual_seed(0)
            model = build_model(STUDENT, data.sample_shape, cache.num_classes, data.input_stats).to(
                device
            )
            fit(model, source, loss, tcfg, device, desc="bench")

        return go

    t_kd, kd_all = median_time(epoch(kd_source, kd_loss), reps, sync)
    t_ce, ce_all = median_time(epoch(ce_source, ce_loss), reps, sync)
    return {
        "kd_epoch_from_cache_s": t_kd,
        "ce_epoch_s": t_ce,
        "ratio": t_kd / t_ce,
        "goal": "<= 1.05",
        "loader": plan.mode,
        "runs": {"kd": kd_all, "ce": ce_all},
    }


def p2(
    root: Path,
    cache: Path,
    teachers: list[str],
    data,
    t_cache: float,
    t_inf: float,
    device_name: str,
    reps: int,
    sync: Callable[[], None],
    k: int = 3,
    epochs: int = 1,
) -> dict:
    """K settings (temperatures) of the paper's student: from the cache vs online KD, through the
    real sweep."""
    counter = iter(range(10_000))
    seconds: dict[str, list[float]] = {"cached": [], "online": []}

    def sweep(kind: str) -> Callable[[], None]:
        def go() -> None:
            source = (
                {"cache": str(cache)}
                if kind == "cached"
                else {"online_teacher": teachers, "dataset": data.spec}
            )
            cfg = SweepConfig(
                base=StudentConfig(
                    **source,
                    eval="",
                    device=device_name,
                    train=TrainConfig(epochs=epochs, batch_size=128),
                ),
                temperatures=[2.0, 4.0, 8.0, 20.0][:k],
                alphas=[0.9],
                students=[STUDENT],
                workers=0,
                out=str(root / f"p2-{kind}-{next(counter)}"),
            )
            res = run_sweep(cfg, log=lambda s: None, progress=False)
            if res.failed or res.trained != k:
                raise RuntimeError(
                    f"bench P2 {kind} sweep: {res.failed} of {k} settings failed: "
                    + "; ".join(r["error"] for r in res.rows if r["error"])
                )
            seconds[kind] += [r["train_seconds"] for r in res.rows]

        return go

    t_cached, cached_all = median_time(sweep("cached"), reps, sync)
    t_online, online_all = median_time(sweep("online"), reps, sync)
    student = statistics.median(seconds["cached"])  # one setting's training alone
    online_student = statistics.median(seconds["online"])
    device = resolve_device(device_name)
    models = [load_checkpoint(p, device).model for p in teachers]

    def forward() -> (
        None
    ):  # the teachers' forward pass over the transfer set, data and weights already loaded
        for m in models:
            predict_logits(m, data.x, device, 1024)

    t_forward, _ = median_time(forward, reps, sync)
    measured = (t_cache + t_cached) / t_online
    # The ideal: the teachers' forward pass once + K trainings, vs K trainings that each pay that
    # forward pass again in every epoch. Everything else a run does (loading, checkpoints, metrics)
    # is what keeps measured above it.
    ideal = (t_forward + k * student) / (k * (student + epochs * t_forward))
    return {
        "k": k,
        "epochs": epochs,
        "cache_logits_s": t_cache,
        "sweep_cached_s": t_cached,
        "sweep_online_s": t_online,
        "student_train_s": student,
        "online_train_s": online_student,
        "teacher_forward_s": t_forward,
        "teacher_inference_s": t_inf,
        "ratio": measured,
        "ideal": ideal,
        "vs_ideal": measured / ideal,
        "goal": "<= 1.1 x ideal",
        "runs": {"cached": cached_all, "online": online_all},
    }


def p4(location: Path, x: np.ndarray, reps: int) -> dict:
    cache = LogitCache(location)
    members = list(range(len(cache.members)))
    shards = cache.done_shards()
    payload = cache.n * cache.num_classes * len(members) * 2
    src = StreamingCacheSource(
        cache, x, members, "mean-probs", 4.0, shards, batch_size=1024, buffer_shards=4
    )
    raw = np.concatenate(
        [
            cache.read_logits(int(s))
            .transpose(1, 0, 2)
            .reshape(-1, len(members) * cache.num_classes)
            for s in shards
        ]
    )  # (N, M*C) float16: the same bytes, laid out for one sequential read
    npy = location.parent / f"{location.name}.npy"
    np.save(npy, raw)

    def stream() -> (
        None
    ):  # the training loader: shuffled shards, prefetch, ensemble combination, batches
        for _ in src.epoch(0):
            pass

    order = np.random.default_rng(0).permutation(shards)

    def reads() -> None:  # the read path alone: shuffled whole-shard reads, decoded (zstd + crc32c)
        for s in order:
            cache.read_logits(int(s))

    def sequential() -> None:
        np.load(npy)

    def codec() -> None:  # the codec limit: whole-shard reads on every core, nothing else
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(lambda s: cache.read_logits(int(s)), order))

    t_stream, stream_all = median_time(stream, reps, lambda: None)
    t_reads, _ = median_time(reads, reps, lambda: None)
    t_codec, codec_all = median_time(codec, reps, lambda: None)
    t_raw, raw_all = median_time(sequential, reps, lambda: None)
    return {
        "stream_MBps": payload / t_stream / 1e6,
        "reads_MBps": payload / t_reads / 1e6,
        "codec_MBps": payload / t_codec / 1e6,
        "raw_npy_MBps": payload / t_raw / 1e6,
        "rows_per_s": cache.n / t_stream,
        "codec_rows_per_s": cache.n / t_codec,
        "ratio": t_codec / t_stream,
        "raw_ratio": t_raw / t_stream,
        "reads_ratio": t_raw / t_reads,
        "goal": ">= 0.8",
        "payload_bytes": payload,
        "runs": {"stream": stream_all, "codec": codec_all},
    }


FOLDER_ROWS = 5000
FOLDER_LOADER_WORKERS = 2


def p3_folder(
    root: Path, device: torch.device, device_name: str, reps: int, log: Callable[[str], None]
) -> dict:
    """P3 on a folder of PNG files (``folder:``): decoding by DataLoader workers is in both the
    cache's time and inference's, as it is for a user's image folder."""
    try:
        from PIL import Image
    except ImportError:
        return {"skipped": "Pillow is not installed (pip install 'kd-pipeline[vision]')"}
    src = load_dataset(f"fashion-mnist:train:count={FOLDER_ROWS}:seed=1")
    for i, (img, y) in enumerate(zip(src.x, src.y, strict=True)):
        d = root / "images" / "train" / f"{int(y)}-{slug(src.class_names[int(y)])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(d / f"{i:05d}.png")
    spec = f"folder:{root / 'images'}:train:mode=grey"
    data = load_dataset(spec)
    log(f"[folder] {len(data)} PNG files, teachers {MEMBERS} x {TEACHER}")
    paths = make_teachers(
        root,
        {"spec": data.spec, "fingerprint": data.fingerprint},
        len(data.class_names),
        data.sample_shape,
        data.input_stats,
    )
    batch = 1024

    def infer() -> None:
        # The same DataLoader (workers decoding PNGs) feeding the teachers, without a cache.
        x = load_dataset(spec).x
        x.set_loader(FOLDER_LOADER_WORKERS, batch)
        bounds = [(a, min(a + 4096, len(x))) for a in range(0, len(x), 4096)]
        x.plan(bounds)
        models = [load_checkpoint(p, device).model for p in paths]
        for a, b in bounds:
            rows, _ = x.read_rows(a, b)
            for m in models:
                predict_logits(m, rows, device, batch)

    counter = iter(range(10_000))

    def cache() -> None:
        build_cache(
            CacheConfig(
                teachers=paths,
                dataset=spec,
                out=str(root / f"cache-{next(counter)}"),
                batch_size=batch,
                device=device_name,
                loader_workers=FOLDER_LOADER_WORKERS,
                command="bench",
            ),
            log=lambda s: None,
            progress=False,
        )

    t_inf, inf_all = median_time(infer, reps, lambda: None)
    t_cache, cache_all = median_time(cache, reps, lambda: None)
    return {
        "cache_logits_s": t_cache,
        "inference_only_s": t_inf,
        "ratio": t_cache / t_inf,
        "goal": "<= 1.05",
        "runs": {"cache": cache_all, "inference": inf_all},
    }


def p6(dense: Path, paths: list[str], data, batch: int, device_name: str, reps: int) -> dict:
    """Loader epochs (shuffled shards, prefetch, targets at T, batches) per storage kind."""
    seconds: dict[str, float] = {}
    runs: dict[str, list[float]] = {}
    for store in ("dense", "topk:20", "sampled:12"):
        where = dense
        if store != "dense":
            where = dense.parent / f"{dense.name}-{store.replace(':', '')}"
            build_cache(
                CacheConfig(
                    teachers=paths,
                    dataset=data.spec,
                    out=str(where),
                    store=store,
                    batch_size=batch,
                    device=device_name,
                    command="bench",
                ),
                log=lambda s: None,
                progress=False,
            )
        cache = LogitCache(where)
        members = list(range(len(cache.members)))
        src = StreamingCacheSource(
            cache, data.x, members, "mean-probs", 4.0, cache.done_shards(), 1024, 4
        )

        def epoch(src: StreamingCacheSource = src) -> None:
            for _ in src.epoch(0):
                pass

        seconds[store], runs[store] = median_time(epoch, reps, lambda: None)
    return {
        "epoch_s": seconds,
        "rows_per_s": {k: len(data) / v for k, v in seconds.items()},
        "ratio": seconds["topk:20"] / seconds["dense"],
        "sampled_ratio": seconds["sampled:12"] / seconds["dense"],
        "goal": "<= 1.1",
        "runs": runs,
        "bytes": storage_byte_table(),
    }


_RSS_CHILD = r"""
import json, resource, sys
import numpy as np


def peak_rss():
    # VmHWM belongs to this process image; ru_maxrss on Linux keeps the parent's peak across
    # fork + exec.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


from pipeline.cache.read import LogitCache
from pipeline.training.loader import cache_source
location, budget = sys.argv[1], int(sys.argv[2])
cache = LogitCache(location)
x = np.zeros((cache.n, 4), dtype=np.uint8)
src, plan = cache_source(cache, x, list(range(len(cache.members))), "mean-probs", 4.0, 256, budget)
before = peak_rss()
seen = 0
for xb, tb, yb in src.epoch(0):
    seen += xb.shape[0]
peak = peak_rss()
print(json.dumps({"mode": plan.mode, "rows_seen": seen, "rss_growth": max(0, peak - before)}))
"""


def p4_rss(rows: int = 40_000, classes: int = 1000, members: int = 2) -> dict:
    """Stream a cache ~10x larger than the budget in a fresh child process and measure its peak RSS
    growth.

    The cache is written here (random logits); the child only opens and streams it, so its peak RSS
    before streaming is imports + an open cache, and the growth is the loader's own.
    """
    with tempfile.TemporaryDirectory(prefix="kd-rss-") as tmp:
        location = Path(tmp) / "c.zarr"
        x = np.zeros((rows, 4), dtype=np.uint8)
        meta = {
            "spec": "synthetic",
            "fingerprint": fingerprint_arrays(x, None),
            "n": rows,
            "input_stats": [0.0, 1.0],
        }
        group = create_cache(
            location,
            dataset=meta,
            ids=np.arange(rows),
            labels=None,
            num_classes=classes,
            class_names=[str(i) for i in range(classes)],
            members=[
                {"checkpoint_sha256": f"sha256:{i}", "num_classes": classes, "path": "synthetic"}
                for i in range(members)
            ],
            dtype="float16",
            rows_per_shard=1024,
            command="bench",
        )
        rng = np.random.default_rng(0)
        handles: dict = {}
        for k in range(members):
            for s in range(group.attrs["kd_cache"]["n_shards"]):
                a, b = shard_bounds(s, 1024, rows)
                write_shard(
                    group,
                    k,
                    s,
                    rng.normal(0, 3, size=(b - a, classes)).astype(np.float32),
                    np.arange(a, b),
                    handles,
                )
        mark_complete(location)
        payload = rows * classes * members * 2
        budget = payload // 10
        out = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(location), str(budget)],
            capture_output=True,
            text=True,
            check=True,
        )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(
        {
            "rows": rows,
            "budget": budget,
            "raw_payload": payload,
            "combined_float32": rows * classes * 4,
            "limit": budget + (300 << 20),
        }
    )
    res["ok"] = res["rss_growth"] <= res["limit"] and res["rows_seen"] == rows
    return res
