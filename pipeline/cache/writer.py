"""Filling a logit cache: teacher inference over shards, in one process or on a dask cluster.

The plan is always the same: open or create the cache (schema first), work out which member-shards are missing
(the done flags, never "a file exists"), compute them, write each whole shard then its flag, and mark the cache
complete last. A single process overlaps inference with compression and writing through a writer thread; with
``--workers``/``--scheduler`` shard ranges are mapped over dask workers, each of which loads the teachers once.
Both paths run the same per-shard function on the same batch boundaries, so their caches are bit-identical.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from pipeline.cache.format import (
    ATTR_KEY,
    CacheLock,
    LogitCache,
    add_member_arrays,
    create_cache,
    mark_complete,
    read_header,
    remove_partial_files,
    shard_bounds,
    write_shard,
)
from pipeline.cache.location import is_local_dir, is_zip, open_store
from pipeline.checkpoints import LoadedModel, fit_problems, load_checkpoint, member_paths
from pipeline.config import CacheConfig
from pipeline.datasets import Dataset, load_dataset
from pipeline.devices import describe_device, resolve_device
from pipeline.errors import CacheError, CheckpointError
from pipeline.metrics import predict_logits

DEFAULT_DTYPE = "float16"
DEFAULT_ROWS_PER_SHARD = 4096


@dataclass
class WorkSpec:
    """Everything a (possibly remote) worker needs to compute shards. Plain data: it is pickled to workers."""

    location: str
    dataset_spec: str
    dataset_fingerprint: str
    data_dir: str | None
    checkpoints: dict[int, tuple[str, str]]  # member index -> (path, sha256)
    device: str
    batch_size: int
    torch_threads: int = 0
    storage_options: dict = field(default_factory=dict)  # for an object-store location (workers open it too)
    tasks: list[tuple[int, list[int]]] = field(default_factory=list)  # (shard, member indices)


def compute_shard(spec: WorkSpec, models: dict[int, torch.nn.Module], data: Dataset, layout: tuple[int, int],
                  shard: int, members: list[int], device: torch.device,
                  emit: Callable[[int, int, np.ndarray, np.ndarray], None]) -> int:
    """Compute one shard for the given members and hand each result to ``emit(member, shard, logits, ids)``.

    Args:
        layout: the cache's (rows_per_shard, n).
    """
    start, stop = shard_bounds(shard, *layout)
    x = data.x[start:stop]
    ids = data.ids[start:stop]
    for m in members:
        emit(m, shard, predict_logits(models[m], x, device, spec.batch_size).numpy(), ids)
    return stop - start


# Per-process state of a dask worker: teachers and dataset are loaded once, not per task.
_WORKER_STATE: dict[tuple, tuple[dict[int, torch.nn.Module], Dataset, torch.device]] = {}


def _worker_state(spec: WorkSpec) -> tuple[dict[int, torch.nn.Module], Dataset, torch.device]:
    key = (spec.location, spec.dataset_fingerprint, tuple(sorted(spec.checkpoints.items())), spec.device)
    if key not in _WORKER_STATE:
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        device = resolve_device(spec.device)
        data = load_dataset(spec.dataset_spec, spec.data_dir)
        if data.fingerprint != spec.dataset_fingerprint:
            raise CacheError(f"worker sees dataset {spec.dataset_spec} with fingerprint {data.fingerprint}, the "
                             f"cache expects {spec.dataset_fingerprint}; workers must see the same files")
        models = {}
        for m, (path, sha) in spec.checkpoints.items():
            lm = load_checkpoint(path, device)
            if lm.sha256 != sha:
                raise CacheError(f"worker's {path} has sha256 {lm.sha256}, expected {sha}: the file differs")
            models[m] = lm.model
        _WORKER_STATE.clear()  # one cache job at a time per worker: free the previous teachers
        _WORKER_STATE[key] = (models, data, device)
    return _WORKER_STATE[key]


def run_worker_tasks(spec: WorkSpec) -> list[tuple[int, int]]:
    """Dask task: compute and write ``spec.tasks`` (whole shards). Returns [(shard, rows)]."""
    models, data, device = _worker_state(spec)
    group = zarr.open_group(open_store(spec.location, "w", spec.storage_options), mode="r+", use_consolidated=False)
    h = group.attrs[ATTR_KEY]
    handles: dict = {}
    done = []
    for shard, members in spec.tasks:
        rows = compute_shard(spec, models, data, (h["rows_per_shard"], h["n"]), shard, members, device,
                             lambda m, s, lg, ids: write_shard(group, m, s, lg, ids, handles))
        done.append((shard, rows))
    return done


@dataclass
class CacheResult:
    location: str
    status: str  # "created" | "resumed" | "already-complete" | "member-added"
    shards_computed: int
    rows_computed: int
    seconds: float
    members: int
    message: str


def _describe_difference(h: dict, data: Dataset, shas: list[str], cfg: CacheConfig) -> list[str]:
    diffs = []
    d = h["dataset"]
    if d["fingerprint"] != data.fingerprint:
        diffs.append(f"dataset: the cache holds {d['spec']} with fingerprint {d['fingerprint']}, you gave "
                     f"{data.spec} with fingerprint {data.fingerprint}")
    have = [m["checkpoint_sha256"] for m in h["members"]]
    if have != shas:
        diffs.append("teachers: the cache's members are "
                     + ", ".join(f"{m['path']} ({m['checkpoint_sha256'][:19]})" for m in h["members"])
                     + "; you gave " + ", ".join(s[:19] for s in shas))
    if cfg.dtype and cfg.dtype != h["dtype"]:
        diffs.append(f"dtype: the cache stores {h['dtype']}, you asked for {cfg.dtype}")
    if cfg.rows_per_shard and cfg.rows_per_shard != h["rows_per_shard"]:
        diffs.append(f"rows per shard: the cache uses {h['rows_per_shard']}, you asked for {cfg.rows_per_shard}")
    return diffs


def build_cache(cfg: CacheConfig, log: Callable[[str], None] = print, progress: bool = True) -> CacheResult:
    """Create, resume or extend the cache at ``cfg.out``; see the module docstring.

    Raises:
        CacheError, CheckpointError, DatasetError: with what differs / is wrong and what to do.
    """
    cfg.validate()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    paths = [p for t in cfg.teachers for p in member_paths(t)]
    loaded: list[LoadedModel] = [load_checkpoint(p, "cpu") for p in paths]
    data = load_dataset(cfg.dataset, cfg.data_dir)
    _check_members(loaded, data)
    num_classes = int(loaded[0].meta["num_classes"])
    class_names = loaded[0].meta.get("class_names") or data.class_names
    shas = [lm.sha256 for lm in loaded]
    location = str(cfg.out)
    opts = cfg.storage_options
    if is_zip(location):
        raise CacheError(f"{location}: a .zarr.zip bundle is written once by `kd-pipeline cache pack`; write the cache "
                         f"to a directory or s3:// URL, then `kd-pipeline cache pack CACHE {location}`")
    existing = read_header(location, opts)
    if is_local_dir(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        if existing is None:
            Path(location).mkdir(parents=True, exist_ok=True)
    with CacheLock(location, opts) as lock:
        existing = read_header(location, opts)  # again, now that no other writer can be making or finishing it
        create: Callable[[], object] | None = None
        if existing is None:
            if cfg.add_member:
                raise CacheError(f"{location}: --add-member needs an existing complete cache; drop --add-member "
                                 "to create one")
            rows_per_shard = cfg.rows_per_shard or DEFAULT_ROWS_PER_SHARD

            def create() -> object:
                return create_cache(location, dataset=data.describe(), ids=data.ids, labels=data.y,
                                    num_classes=num_classes, class_names=class_names,
                                    members=[lm.identity() for lm in loaded], dtype=cfg.dtype or DEFAULT_DTYPE,
                                    rows_per_shard=rows_per_shard, command=cfg.command, storage_options=opts)

            if cfg.workers or cfg.scheduler:
                create()  # workers open the store: it must exist before they start
                create = None
            status = "created"
        elif cfg.add_member:
            status = _add_members(location, existing, loaded, data, num_classes, opts)
            if status == "already-members":
                return CacheResult(location, "already-complete", 0, 0, time.perf_counter() - t0,
                                   len(existing["members"]),
                                   f"{location}: every given teacher is already a member; nothing to do")
        else:
            diffs = _describe_difference(existing, data, shas, cfg)
            if diffs:
                raise CacheError(f"{location} already holds a different cache:\n  " + "\n  ".join(diffs)
                                 + "\nUse another --out, or --add-member to add a teacher to a complete cache")
            if existing["complete"]:
                return CacheResult(location, "already-complete", 0, 0, time.perf_counter() - t0,
                                   len(existing["members"]),
                                   f"{location} is already complete ({existing['n']} rows, "
                                   f"{len(existing['members'])} members); nothing to do")
            removed = remove_partial_files(location)
            if removed:
                log(f"removed {removed} temporary files left by an interrupted write")
            status = "resumed"
        by_sha = {lm.sha256: lm for lm in loaded}
        if create is not None:
            # A new cache in this process: every member-shard is pending, and the store is created by the writer
            # thread while this one already runs the teachers (creation is a fixed cost; here it overlaps).
            n = len(data)
            h = {"n": n, "rows_per_shard": rows_per_shard, "n_shards": math.ceil(n / rows_per_shard),
                 "num_classes": num_classes, "members": [{"index": i, "checkpoint_sha256": lm.sha256}
                                                         for i, lm in enumerate(loaded)]}
            tasks = [(s, [m["index"] for m in h["members"]]) for s in range(h["n_shards"])]
        else:
            cache = LogitCache(location, allow_partial=True, storage_options=opts)
            h = cache.header
            pending: dict[int, list[int]] = {}
            for m in h["members"]:
                for s in np.flatnonzero(~cache.done_flags(m["index"])):
                    pending.setdefault(int(s), []).append(m["index"])
            tasks = sorted(pending.items())
        checkpoints = {m["index"]: (str(by_sha[m["checkpoint_sha256"]].path), m["checkpoint_sha256"])
                       for m in h["members"] if m["checkpoint_sha256"] in by_sha}
        rows_total = sum(np.subtract(*shard_bounds(s, h["rows_per_shard"], h["n"])[::-1]) for s, _ in tasks)
        spec = WorkSpec(location, data.spec, data.fingerprint, cfg.data_dir, checkpoints, cfg.device,
                        cfg.batch_size, storage_options=dict(opts))
        log(f"{status} {location}: {len(tasks)}/{h['n_shards']} shards to compute for {len(h['members'])} "
            f"member(s), {rows_total} rows, on {describe_device(device)}")
        bar = tqdm(total=int(rows_total), unit="row", unit_scale=True, desc="cache-logits", disable=not progress)
        try:
            if cfg.workers or cfg.scheduler:
                _run_dask(spec, tasks, cfg, device, bar)
            else:
                models = {m: by_sha[sha].model.to(device) for m, (_, sha) in checkpoints.items()}
                _run_local(spec, tasks, models, data, device, bar, (h["rows_per_shard"], h["n"]), create,
                           check=lock.check)
        finally:
            bar.close()
        lock.check()  # an object-store lease lost mid-write: do not declare someone else's cache complete
        mark_complete(location, opts)
    seconds = time.perf_counter() - t0
    return CacheResult(location, status, len(tasks), int(rows_total), seconds, len(h["members"]),
                       f"{location} complete: {h['n']} rows x {h['num_classes']} classes x {len(h['members'])} "
                       f"member(s), {len(tasks)} shards computed in {seconds:.1f}s")


def _check_members(loaded: list[LoadedModel], data: Dataset) -> None:
    classes = {int(lm.meta["num_classes"]) for lm in loaded}
    if len(classes) > 1:
        raise CheckpointError("teachers disagree on the number of classes: "
                              + ", ".join(f"{lm.path}: {lm.meta['num_classes']}" for lm in loaded)
                              + "; every member of one cache must predict the same classes")
    problems = fit_problems(loaded, data)
    if problems:
        raise CheckpointError("; ".join(problems))
    shas = [lm.sha256 for lm in loaded]
    if len(set(shas)) != len(shas):
        raise CheckpointError("the same checkpoint was given twice: " + ", ".join(str(lm.path) for lm in loaded))


def _add_members(location: str, h: dict, loaded: list[LoadedModel], data: Dataset, num_classes: int,
                 storage_options: dict) -> str:
    if not h["complete"]:
        raise CacheError(f"{location} is partial; finish it first by re-running cache-logits without --add-member, "
                         "giving every member's checkpoint in order ("
                         + ", ".join(str(m.get("path")) for m in h["members"]) + "), then add members")
    if h["dataset"]["fingerprint"] != data.fingerprint:
        raise CacheError(f"--add-member: the cache was made on {h['dataset']['spec']} (fingerprint "
                         f"{h['dataset']['fingerprint']}), you gave {data.spec} ({data.fingerprint})")
    if num_classes != h["num_classes"]:
        raise CacheError(f"--add-member: the new teacher predicts {num_classes} classes, the cache has "
                         f"{h['num_classes']}")
    have = {m["checkpoint_sha256"] for m in h["members"]}
    new = [lm for lm in loaded if lm.sha256 not in have]
    if not new:
        return "already-members"
    group = zarr.open_group(open_store(location, "w", storage_options), mode="r+", use_consolidated=False)
    for lm in new:
        add_member_arrays(group, lm.identity())
    return "member-added"


def _run_local(spec: WorkSpec, tasks: list[tuple[int, list[int]]], models: dict[int, torch.nn.Module],
               data: Dataset, device: torch.device, bar: tqdm, layout: tuple[int, int],
               create: Callable[[], object] | None = None, check: Callable[[], None] = lambda: None) -> None:
    """One process: inference on this thread; creating the store (``create``, for a new cache), compression and
    writes on a writer thread, so they overlap with inference."""
    handles: dict = {}
    q: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []
    ready: list[zarr.Group] = []

    def writer() -> None:
        try:
            if create is not None:
                create()
            ready.append(zarr.open_group(open_store(spec.location, "w", spec.storage_options), mode="r+",
                                         use_consolidated=False))
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            failure.append(e)
        group = ready[0] if ready else None
        while True:
            item = q.get()
            if item is None:
                return
            if failure:
                continue  # drain after an error so the producer never blocks
            try:
                write_shard(group, *item, handles=handles)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                failure.append(e)

    thread = threading.Thread(target=writer, name="cache-writer", daemon=True)
    thread.start()
    try:
        for shard, members in tasks:
            if failure:
                break
            check()  # a lost object-store lease stops the work now, not after the last shard
            rows = compute_shard(spec, models, data, layout, shard, members, device,
                                 lambda m, s, lg, ids: q.put((m, s, lg, ids)))
            bar.update(rows)
    finally:
        q.put(None)
        thread.join()
    if failure:
        raise failure[0]


def _run_dask(spec: WorkSpec, tasks: list[tuple[int, list[int]]], cfg: CacheConfig, device: torch.device,
              bar: tqdm) -> None:
    """Map shard ranges over dask workers (a LocalCluster of processes, or an existing scheduler)."""
    from dask.distributed import as_completed

    from pipeline.cluster import dask_cluster

    with dask_cluster(cfg.workers, cfg.scheduler, gpu=device.type == "cuda") as cluster:
        # An external scheduler's workers keep their own torch threads (0); a local cluster splits the cores.
        spec.torch_threads = 0 if cfg.scheduler else cluster.torch_threads
        per_task = max(1, math.ceil(len(tasks) / (cluster.workers * 4)))
        chunks = [tasks[i:i + per_task] for i in range(0, len(tasks), per_task)]
        specs = [WorkSpec(**{**spec.__dict__, "tasks": c}) for c in chunks]
        futures = cluster.client.map(run_worker_tasks, specs, pure=False, resources=cluster.resources)
        for fut in as_completed(futures):
            for _, rows in fut.result():
                bar.update(rows)
