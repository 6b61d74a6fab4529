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
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.config import CacheConfig
from pipeline.cache.create import create_cache
from pipeline.cache.layout import shard_bounds
from pipeline.cache.read import LogitCache
from pipeline.cache.write import mark_complete, write_shard
from pipeline.cache.writer import build_cache
from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.datasets import fingerprint_arrays, load_dataset
from pipeline.devices import describe_device, resolve_device
from pipeline.errors import ConfigError
from pipeline.experiments.config import SweepConfig
from pipeline.experiments.storage import byte_table as storage_byte_table
from pipeline.experiments.sweep import run_sweep
from pipeline.files import slug
from pipeline.metrics import predict_logits
from pipeline.models import build_model
from pipeline.options import option
from pipeline.registry import Registry
from pipeline.step_options import device_option
from pipeline.training.config import StudentConfig
from pipeline.training.loader import StreamingCacheSource, cache_source
from pipeline.training.loop import InMemorySource, TrainConfig, fit
from pipeline.training.losses import DistillationLoss

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


TEACHER = "mlp:1200,1200"
STUDENT = "mlp:800,800"
MEMBERS = 3


def _median_time(
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


def _teachers(
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
    results["machine"]["load_before"] = _load_average()
    fig = results["figures"]
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        root = Path(tmp)
        _measure(root, data, 10, device, device_name, reps, sync, fig, log)
        # The 1000-class case runs on the same inputs without labels (an unlabeled transfer set).
        np.savez(root / "unlabeled.npz", x_train=data.x)
        unlabeled = load_dataset(f"npz:{root / 'unlabeled.npz'}:train")
        _measure(root, unlabeled, 1000, device, device_name, reps, sync, fig, log)
    with tempfile.TemporaryDirectory(prefix="kd-bench-folder-") as tmp:
        fig["P3 folder"] = _p3_folder(Path(tmp), device, device_name, reps, log)
    fig["P4 rss"] = _p4_rss()
    results["machine"]["load_after"] = _load_average()
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
    paths = _teachers(
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

    t_inf, inf_all = _median_time(infer, reps, sync)
    t_cache, cache_all = _median_time(cache, reps, sync)
    fig[f"P3 {label}"] = {
        "cache_logits_s": t_cache,
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
    fig[f"P4 {label}"] = _p4(kept, data.x, reps)
    if classes == 1000:
        fig["P6 1000 classes"] = _p6(kept, paths, data, batch, device_name, reps)
    if classes == 10:
        fig["P1"] = _p1(LogitCache(kept), data, device, reps, sync)
        fig["P2"] = _p2(root, kept, paths, data, t_cache, t_inf, device_name, reps, sync)


def _p1(cache: LogitCache, data, device: torch.device, reps: int, sync: Callable[[], None]) -> dict:
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

    t_kd, kd_all = _median_time(epoch(kd_source, kd_loss), reps, sync)
    t_ce, ce_all = _median_time(epoch(ce_source, ce_loss), reps, sync)
    return {
        "kd_epoch_from_cache_s": t_kd,
        "ce_epoch_s": t_ce,
        "ratio": t_kd / t_ce,
        "goal": "<= 1.05",
        "loader": plan.mode,
        "runs": {"kd": kd_all, "ce": ce_all},
    }


def _p2(
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

    t_cached, cached_all = _median_time(sweep("cached"), reps, sync)
    t_online, online_all = _median_time(sweep("online"), reps, sync)
    student = statistics.median(seconds["cached"])  # one setting's training alone
    online_student = statistics.median(seconds["online"])
    device = resolve_device(device_name)
    models = [load_checkpoint(p, device).model for p in teachers]

    def forward() -> (
        None
    ):  # the teachers' forward pass over the transfer set, data and weights already loaded
        for m in models:
            predict_logits(m, data.x, device, 1024)

    t_forward, _ = _median_time(forward, reps, sync)
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


def _p4(location: Path, x: np.ndarray, reps: int) -> dict:
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

    t_stream, stream_all = _median_time(stream, reps, lambda: None)
    t_reads, _ = _median_time(reads, reps, lambda: None)
    t_codec, codec_all = _median_time(codec, reps, lambda: None)
    t_raw, raw_all = _median_time(sequential, reps, lambda: None)
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


def _p3_folder(
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
    paths = _teachers(
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

    t_inf, inf_all = _median_time(infer, reps, lambda: None)
    t_cache, cache_all = _median_time(cache, reps, lambda: None)
    return {
        "cache_logits_s": t_cache,
        "inference_only_s": t_inf,
        "ratio": t_cache / t_inf,
        "goal": "<= 1.05",
        "runs": {"cache": cache_all, "inference": inf_all},
    }


def _p6(dense: Path, paths: list[str], data, batch: int, device_name: str, reps: int) -> dict:
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

        seconds[store], runs[store] = _median_time(epoch, reps, lambda: None)
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


def _p4_rss(rows: int = 40_000, classes: int = 1000, members: int = 2) -> dict:
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


# A figure whose repeats differ by more than this share of their median is not a measurement of
# the code but of the machine (another job took the cores meanwhile).
MAX_SPREAD = 0.25
# A 1-minute load average above this share of the cores before the bench: someone else is busy.
MAX_LOAD_SHARE = 0.5


def _load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def spread(fig: dict) -> float:
    """The largest (max - min) / median over a figure's timed repeats (0 without repeats)."""
    out = 0.0
    for times in (fig.get("runs") or {}).values():
        if len(times) > 1 and statistics.median(times) > 0:
            out = max(out, (max(times) - min(times)) / statistics.median(times))
    return out


def verdict(fig: dict) -> str:
    """``met`` or ``not met`` against the figure's goal; ``reported`` for figures without one."""
    goal = fig.get("goal", "reported")
    if "limit" in fig:  # P4 rss: peak growth against budget + 300 MiB
        return "met" if fig["ok"] else "not met"
    if goal == "reported":
        return "reported"
    op, bound = goal.split()[:2]
    value = fig["vs_ideal"] if "x ideal" in goal else fig["ratio"]
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return "met" if ok else "not met"


def bench_warnings(results: dict) -> list[str]:
    """Why some figures may not be trusted: a loaded machine, repeats that disagree."""
    m, out = results["machine"], []
    cores = m.get("cores") or 1
    load = m.get("load_before")
    if load is not None and load > MAX_LOAD_SHARE * cores:
        out.append(
            f"the load average was {load:.1f} on {cores} cores before the bench started: "
            "other processes share the CPU, so the ratios are unreliable; re-run on an "
            "idle machine"
        )
    for key, fig in results["figures"].items():
        s = spread(fig)
        if s > MAX_SPREAD:
            out.append(
                f"{key}: its repeats differ by {s:.0%} of their median (more than "
                f"{MAX_SPREAD:.0%}): the machine was busy meanwhile, the figure is "
                "unreliable"
            )
    return out


def _row(key: str, measures: str, value: str, fig: dict) -> str:
    unreliable = " (unreliable)" if spread(fig) > MAX_SPREAD else ""
    goal = fig.get("goal", "reported")
    return f"| {key.split()[0]} | {measures} | {value} | {goal} | {verdict(fig)}{unreliable} |"


def format_table(results: dict) -> str:
    """The figures as a Markdown table, P1 to P5, each with its goal and whether it is met; then
    the warnings (a loaded machine, repeats that disagree)."""
    f = results["figures"]
    m = results["machine"]
    lines = [
        f"kd-pipeline bench --scale {results['scale']}: {results['rows']} rows; "
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['device']}",
        "",
        "| id | measures | value | goal | verdict |",
        "|---|---|---|---|---|",
    ]
    if "P1" in f:
        v = f["P1"]
        lines.append(
            _row(
                "P1",
                f"KD epoch from cache {v['kd_epoch_from_cache_s']:.2f}s / CE epoch "
                f"{v['ce_epoch_s']:.2f}s ({v['loader']} loader)",
                f"{v['ratio']:.3f}",
                v,
            )
        )
    if "P2" in f:
        v = f["P2"]
        lines.append(
            _row(
                "P2",
                f"cache-logits {v['cache_logits_s']:.2f}s + sweep of {v['k']} "
                f"from cache {v['sweep_cached_s']:.2f}s / online-KD sweep "
                f"{v['sweep_online_s']:.2f}s (ideal {v['ideal']:.3f})",
                f"{v['ratio']:.3f} ({v['vs_ideal']:.2f} x ideal)",
                v,
            )
        )
    for key in sorted((k for k in f if k.startswith("P3")), key=_classes):
        v = f[key]
        if "skipped" in v:
            lines.append(f"| P3 | {key[3:]}: skipped ({v['skipped']}) | | | |")
            continue
        lines.append(
            _row(
                key,
                f"cache-logits {v['cache_logits_s']:.2f}s / inference "
                f"{v['inference_only_s']:.2f}s ({key[3:]})",
                f"{v['ratio']:.3f}",
                v,
            )
        )
    for key in sorted((k for k in f if k.startswith("P4 ") and k != "P4 rss"), key=_classes):
        v = f[key]
        lines.append(
            _row(
                key,
                f"loader {v['stream_MBps']:.0f} MB/s / the codec limit (whole-shard reads "
                f"on every core) {v['codec_MBps']:.0f} MB/s ({key[3:]})",
                f"{v['ratio']:.3f}",
                v,
            )
        )
        lines.append(
            f"| P4 | loader / raw .npy read {v['raw_npy_MBps']:.0f} MB/s; one-thread shard reads "
            f"{v['reads_MBps']:.0f} MB/s ({key[3:]}) | {v['raw_ratio']:.3f} | (information) | |"
        )
    if "P4 rss" in f:
        r = f["P4 rss"]
        lines.append(
            _row(
                "P4",
                f"peak RSS growth streaming {r['raw_payload'] / 2**20:.0f} MiB "
                f"cache, budget {r['budget'] / 2**20:.0f} MiB ({r['mode']})",
                f"{r['rss_growth'] / 2**20:.0f} MiB",
                {**r, "goal": f"<= {r['limit'] / 2**20:.0f} MiB"},
            )
        )
    for key in sorted((k for k in f if k.startswith("P5")), key=_classes):
        v = f[key]
        lines.append(
            _row(
                key,
                f"bytes/sample/member on disk vs float32 ({key[3:]})",
                f"{v['bytes_per_sample_per_member']:.1f} vs {v['raw_float32']} ({v['ratio']:.2f}x)",
                v,
            )
        )
    if "P6 1000 classes" in f:
        v = f["P6 1000 classes"]
        e = v["epoch_s"]
        lines.append(
            _row(
                "P6",
                f"loader epoch topk:20 {e['topk:20']:.2f}s / dense {e['dense']:.2f}s "
                f"(1000 classes; sampled:12 {e['sampled:12']:.2f}s, "
                f"{v['sampled_ratio']:.2f}x)",
                f"{v['ratio']:.3f}",
                v,
            )
        )
        for b in v["bytes"]:
            lines.append(
                f"| P5 | {b['store']} bytes/row/member on disk, C = {b['classes']:,} "
                f"(synthetic logits; raw {b['raw']:,}) | {b['on_disk']:,.1f} "
                f"({b['vs_dense_raw']:.4f}x dense float16) | reported | |"
            )
    warnings = results.get("warnings", bench_warnings(results))
    if warnings:
        lines += ["", *(f"warning: {w}" for w in warnings)]
    return "\n".join(lines)


def _classes(key: str) -> int:
    """``"P3 1000 classes"`` -> 1000: rows of one id in class order (10 before 1000)."""
    parts = key.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
