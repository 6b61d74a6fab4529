"""Filling a logit cache: teacher inference over shards, in one process or on a dask cluster.

``build_cache`` is a recipe in two steps. :func:`plan_cache` inspects the location and the inputs
and decides what to do (nothing is written): create a new cache, resume a partial one, add members
to a complete one, or nothing (already complete), as a :class:`CachePlan` with the (shard, members)
tasks still missing (the done flags, never "a file exists") and the shard layout.
:func:`execute_plan` then does it: creates the schema or the new members' arrays, computes the
tasks, writes whole shards and only then their flags (:func:`pipeline.cache.write.write_shards`:
the data of a batch of member-shards in one round trip to zarr, then their flags in a second), and
marks the cache complete last. A single process overlaps inference with compression and writing
through a writer thread, which stores each member-shard with its flag as it arrives; with
``--workers``/``--scheduler`` shard ranges are mapped over dask workers, each of which loads the
teachers once. Both paths run the same per-shard function on the same batch boundaries, so their
caches are bit-identical.

The first step, the plan and the inputs it checks, is in :mod:`pipeline.cache.plan`.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr

from pipeline.augment import ViewPlan
from pipeline.cache.config import CacheConfig
from pipeline.cache.create import add_member_arrays, create_cache
from pipeline.cache.header import CacheHeader
from pipeline.cache.layout import group_header, shard_bounds
from pipeline.cache.location import CacheLocation
from pipeline.cache.lock import CacheLock
from pipeline.cache.lookup import read_header
from pipeline.cache.plan import (
    ADDED_WITH,
    CacheInputs,
    CachePlan,
    Task,
    plan_cache,
    rows_of,
    view_plan,
)
from pipeline.cache.write import digest_write, mark_complete, remove_partial_files, write_shards
from pipeline.checkpoints import load_checkpoint
from pipeline.data.lazy import is_lazy, workers_note
from pipeline.datasets import Dataset, load_dataset
from pipeline.devices import describe_device, resolve_device
from pipeline.errors import CacheError, storage_errors
from pipeline.metrics import predict_logits
from pipeline.progress import Bar, progress_bar
from pipeline.sequences.data import is_sequence
from pipeline.sequences.models import token_rows

DEFAULT_DTYPE = "float16"
# Member-shards the writer thread stores at most in one batch (what queued while it was busy).
# One: each member-shard's done flag lands right after its own data. With 8, a run that had queued
# a batch while opening the store marked nothing done for its first seconds, and in one CI run 80
# SIGKILLs in a row, each within ~1.3 s of the plan line, left no progress at all; a job that is
# killed and restarted must always get somewhere. Dask workers still write a shard's members
# together.
WRITE_BATCH = 1


@dataclass
class WorkSpec:
    """Everything a (possibly remote) worker needs to compute shards.

    Plain data: it is pickled to workers.
    """

    location: CacheLocation  # with its storage options: workers open the store too
    dataset_spec: str
    # What the workers' dataset must hash to; None for the writing process's own dataset (a run
    # without workers), whose fingerprint the writer thread then computes for the header while
    # the teachers already run.
    dataset_fingerprint: str | None
    data_dir: str | None
    checkpoints: dict[int, tuple[str, str]]  # member index -> (path, sha256)
    device: str
    batch_size: int
    torch_threads: int = 0
    tasks: list[Task] = field(default_factory=list)
    trust_code: tuple[str, ...] = ()  # what the teachers' recorded specs may import (--trust-code)
    loader_workers: int = 0  # DataLoader processes decoding a lazy dataset (--loader-workers)
    views: ViewPlan | None = None  # a view cache's views: every sample's K augmented inputs


def compute_shard(
    spec: WorkSpec,
    models: dict[int, torch.nn.Module],
    data: Dataset,
    layout: tuple[int, int],
    shard: int,
    members: list[int],
    device: torch.device,
    emit: Callable[[int, int, np.ndarray, np.ndarray], None],
    emit_digests: Callable[[int, np.ndarray], None] | None = None,
) -> int:
    """Compute one shard for the given members and hand each result to
    ``emit(member, shard, logits, ids)``.

    Args:
        layout: the cache's (rows_per_shard, n).
        emit_digests: ``emit_digests(shard, digests)``, called first for a lazy dataset with the
            (rows, 16) content digests of the inputs just decoded (no second pass over them).
    """
    start, stop = shard_bounds(shard, *layout)
    if is_lazy(data.x):
        x, digests = data.x.read_rows(start, stop)  # decoded by DataLoader workers
        if emit_digests is not None:
            emit_digests(shard, digests)
    else:
        x = data.x[start:stop]
    ids = data.ids[start:stop]
    if spec.views is not None:  # rows = samples x views: each view rebuilt from its parameters
        x, _ = spec.views.inputs(x, ids)
    for m in members:
        logits = predict_logits(models[m], x, device, spec.batch_size)
        if logits.dim() == 3:  # a sequence model: one row per (sample, position), real vocab only
            logits = token_rows(logits, data.num_classes)
        emit(m, shard, logits.numpy(), ids)
    return stop - start


# Per-process state of a dask worker: teachers and dataset are loaded once, not per task.
_WORKER_STATE: dict[tuple, tuple[dict[int, torch.nn.Module], Dataset, torch.device]] = {}


def _worker_state(spec: WorkSpec) -> tuple[dict[int, torch.nn.Module], Dataset, torch.device]:
    key = (
        spec.location,
        spec.dataset_fingerprint,
        tuple(sorted(spec.checkpoints.items())),
        spec.device,
    )
    if key not in _WORKER_STATE:
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        device = resolve_device(spec.device)
        data = load_dataset(spec.dataset_spec, spec.data_dir)
        if data.fingerprint != spec.dataset_fingerprint:
            raise CacheError(
                f"worker sees dataset {spec.dataset_spec} with fingerprint "
                f"{data.fingerprint}, the cache expects {spec.dataset_fingerprint}; "
                "workers must see the same files"
            )
        if is_lazy(data.x):
            data.x.set_loader(spec.loader_workers, spec.batch_size)
        models = {}
        for m, (path, sha) in spec.checkpoints.items():
            lm = load_checkpoint(path, device, spec.trust_code)
            if lm.sha256 != sha:
                raise CacheError(
                    f"worker's {path} has sha256 {lm.sha256}, expected {sha}: the file differs"
                )
            models[m] = lm.model
        _WORKER_STATE.clear()  # one cache job at a time per worker: free the previous teachers
        _WORKER_STATE[key] = (models, data, device)
    return _WORKER_STATE[key]


def _writable_group(location: CacheLocation) -> zarr.Group:
    return zarr.open_group(location.open("w"), mode="r+", use_consolidated=False)


def run_worker_tasks(spec: WorkSpec) -> list[tuple[int, int]]:
    """Dask task: compute and write ``spec.tasks`` (whole shards). Returns [(shard, rows)]."""
    models, data, device = _worker_state(spec)
    group = _writable_group(spec.location)
    h = group_header(group, spec.location.display)
    handles: dict = {}
    done = []
    _plan_reads(data, spec.tasks, (h.rows_per_shard, h.n))
    # A shard's members and digests are written together, then their done flags.
    items: list = []
    extra: list = []
    for shard, members in spec.tasks:
        items.clear()
        extra.clear()
        rows = compute_shard(
            spec,
            models,
            data,
            (h.rows_per_shard, h.n),
            shard,
            members,
            device,
            lambda m, s, lg, ids: items.append((m, s, lg, ids)),
            lambda s, dg: extra.append(digest_write(h, s, dg)),
        )
        write_shards(group, items, extra=extra, handles=handles, header=h)
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


# ---------------------------------------------------------------------------------------- executing
def build_cache(
    cfg: CacheConfig, log: Callable[[str], None] = print, progress: bool = True
) -> CacheResult:
    """Create, resume or extend the cache at ``cfg.out``: :func:`plan_cache`, :func:`execute_plan`.

    Raises:
        CacheError, CheckpointError, DatasetError: with what differs / is wrong and what to do.
    """
    cfg.validate()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    inputs = CacheInputs.load(cfg)
    location = cfg.location
    if location.kind == "zip":
        raise CacheError(
            f"{location}: a .zarr.zip bundle is written once by `kd-pipeline cache "
            "pack`; write the cache to a directory or s3:// URL, then `kd-pipeline "
            f"cache pack CACHE {location}`"
        )
    # Storage failures (a full disk, a missing bucket, refused credentials) name the cache.
    with storage_errors(location.display):
        return _build(cfg, location, inputs, device, t0, log, progress)


def _build(
    cfg: CacheConfig,
    location: CacheLocation,
    inputs: CacheInputs,
    device: torch.device,
    t0: float,
    log: Callable[[str], None],
    progress: bool,
) -> CacheResult:
    """:func:`build_cache` once its inputs are loaded and its location is known to be writable."""
    existing = read_header(location)  # refuses what is not a cache before anything is made there
    if location.kind == "dir":
        root = location.local_path
        root.parent.mkdir(parents=True, exist_ok=True)
        if existing is None:
            root.mkdir(parents=True, exist_ok=True)
    with CacheLock(location) as lock:
        plan = plan_cache(cfg, location, inputs)  # under the lock: no other writer changes it now
        if plan.action == "already-complete":
            return CacheResult(
                location.display,
                plan.status,
                0,
                0,
                time.perf_counter() - t0,
                len(plan.members),
                plan.message,
            )
        rows = execute_plan(plan, cfg, inputs, device, lock, log, progress)
    seconds = time.perf_counter() - t0
    h = read_header(location)  # the rows per sample (views, token positions) as written
    return CacheResult(
        location.display,
        plan.status,
        len(plan.tasks),
        rows,
        seconds,
        len(plan.members),
        f"{location} complete: {rows_of(h)} x {plan.num_classes} classes x "
        f"{len(plan.members)} member(s), {len(plan.tasks)} shards computed in "
        f"{seconds:.1f}s",
    )


def execute_plan(
    plan: CachePlan,
    cfg: CacheConfig,
    inputs: CacheInputs,
    device: torch.device,
    lock: CacheLock,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> int:
    """Carry out a create / resume / add-member plan (holding ``lock``); returns the rows computed.

    The store is prepared first (a new cache's schema, new members' arrays, or a resumed cache's
    leftover temporary files removed), then the tasks are computed and written, and the cache is
    marked complete. A new cache computed in this process is created by the writer thread while this
    one already runs the teachers (creation is a fixed cost; there it overlaps).
    """
    on_dask = bool(cfg.workers or cfg.scheduler)
    if plan.action == "resume":
        removed = remove_partial_files(plan.location)
        if removed:
            log(f"removed {removed} temporary files left by an interrupted write")
    elif plan.action == "add-member":
        group = _writable_group(plan.location)
        for lm in plan.new_members:
            identity = {**lm.identity(), ADDED_WITH: "--add-member"}
            add_member_arrays(group, identity, cfg.storage(inputs.num_classes))
    elif plan.action == "create" and on_dask:
        _create(plan, cfg, inputs)  # workers open the store: it must exist before they start
    by_sha = inputs.by_sha()
    checkpoints = {m: (str(by_sha[sha].path), sha) for m, sha in plan.members if sha in by_sha}
    header = None if plan.action == "create" else read_header(plan.location)
    views = None
    if (header is not None and header.augment is not None) or (
        header is None and cfg.augment is not None
    ):
        views = view_plan(cfg, inputs.data, header)
    tasks = list(plan.tasks)
    rows = plan.layout.rows(tasks)
    spec = WorkSpec(
        plan.location,
        inputs.data.spec,
        inputs.data.fingerprint if on_dask else None,
        cfg.data_dir,
        checkpoints,
        cfg.device,
        cfg.batch_size,
        trust_code=tuple(cfg.trust_code),
        loader_workers=cfg.loader_workers,
        views=views,
    )
    if is_lazy(inputs.data.x):
        inputs.data.x.set_loader(cfg.loader_workers, cfg.batch_size)
        note = workers_note(cfg.loader_workers)
        if note:
            log(note)
    log(
        f"{plan.status} {plan.location}: {len(tasks)}/{plan.layout.n_shards} shards to compute for "
        f"{len(plan.members)} member(s), {rows} rows, on {describe_device(device)}"
    )
    bar = progress_bar(
        total=rows, enabled=progress, log=log, unit="row", unit_scale=True, desc="cache-logits"
    )
    try:
        if on_dask:
            _run_dask(spec, tasks, cfg, device, bar)
        else:
            models = {m: by_sha[sha].model.to(device) for m, (_, sha) in checkpoints.items()}
            open_group = functools.partial(_prepared_group, plan, cfg, inputs)
            _run_local(
                spec,
                tasks,
                models,
                inputs.data,
                device,
                bar,
                tuple(plan.layout),
                open_group,
                check=lock.check,
            )
    finally:
        bar.close()
    if on_dask:
        # A dask worker killed mid-write (its shards were recomputed elsewhere) can leave zarr's
        # temporary files; every writer is done now, so they are leftovers, not writes under way.
        remove_partial_files(plan.location)
    lock.check()  # a lease lost mid-write: do not declare someone else's cache complete
    mark_complete(plan.location)
    return rows


def _create(plan: CachePlan, cfg: CacheConfig, inputs: CacheInputs) -> None:
    """Create the planned cache's schema (every array at full size, no logits yet; a view cache's
    view parameters written, like the ids)."""
    data = inputs.data
    views = None if cfg.augment is None else view_plan(cfg, data)
    create_cache(
        plan.location,
        dataset=data.describe(),
        ids=data.ids,
        # A sequence's labels are its next tokens, (N, P): they stay with the dataset (checked by
        # fingerprint), the cache holds one label per sample or none.
        labels=None if is_sequence(data) else data.y,
        num_classes=inputs.num_classes,
        class_names=inputs.class_names,
        members=[lm.identity() for lm in inputs.teachers],
        dtype=cfg.dtype or DEFAULT_DTYPE,
        rows_per_shard=plan.layout.rows_per_shard,
        command=cfg.command,
        storage=cfg.storage(inputs.num_classes),
        seed=cfg.seed,
        views=cfg.views,
        augment=None if views is None else views.record(),
        view_params=None if views is None else views.params(data.ids),
        positions=data.positions if is_sequence(data) else 1,
    )


def _prepared_group(plan: CachePlan, cfg: CacheConfig, inputs: CacheInputs) -> zarr.Group:
    """The writer thread's group: for a new cache computed in this process, created first."""
    if plan.action == "create":
        _create(plan, cfg, inputs)
    return _writable_group(plan.location)


def _run_local(
    spec: WorkSpec,
    tasks: list[Task],
    models: dict[int, torch.nn.Module],
    data: Dataset,
    device: torch.device,
    bar: Bar,
    layout: tuple[int, int],
    open_group: Callable[[], zarr.Group],
    check: Callable[[], None] = lambda: None,
) -> None:
    """One process: inference on this thread; opening (or creating) the store with ``open_group``,
    compression and writes on a writer thread, so they overlap with inference."""
    handles: dict = {}
    q: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []
    ready: list[tuple[zarr.Group, CacheHeader]] = []

    def writer() -> None:
        try:
            group = open_group()
            ready.append((group, group_header(group, spec.location.display)))
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            failure.append(e)
        group, header = ready[0] if ready else (None, None)
        finished = False
        while not finished:
            # Up to WRITE_BATCH queued items are written as one batch: all its data (and a lazy
            # dataset's digests), then all its done flags, two round trips to zarr instead of
            # three per member-shard.
            batch = [q.get()]
            while batch[-1] is not None and len(batch) < WRITE_BATCH:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            finished = batch[-1] is None
            items = [item for item in batch if item is not None]
            if failure or not items:
                continue  # drain after an error so the producer never blocks
            try:
                write_shards(
                    group,
                    [item for item in items if item[0] != "digests"],
                    extra=[
                        digest_write(header, *item[1:]) for item in items if item[0] == "digests"
                    ],
                    handles=handles,
                    header=header,
                )
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                failure.append(e)

    thread = threading.Thread(target=writer, name="cache-writer", daemon=True)
    thread.start()
    _plan_reads(data, tasks, layout)
    try:
        for shard, members in tasks:
            if failure:
                break
            check()  # a lost object-store lease stops the work now, not after the last shard
            rows = compute_shard(
                spec,
                models,
                data,
                layout,
                shard,
                members,
                device,
                lambda m, s, lg, ids: q.put((m, s, lg, ids)),
                lambda s, dg: q.put(("digests", s, dg)),
            )
            bar.update(rows)
    finally:
        q.put(None)
        thread.join()
    if failure:
        raise failure[0]


def _plan_reads(data: Dataset, tasks: list[Task], layout: tuple[int, int]) -> None:
    """A lazy dataset's loader decodes the tasks' shards ahead, in task order."""
    if is_lazy(data.x):
        data.x.plan([shard_bounds(s, *layout) for s, _ in tasks])


def _run_dask(
    spec: WorkSpec, tasks: list[Task], cfg: CacheConfig, device: torch.device, bar: Bar
) -> None:
    """Map shard ranges over dask workers (a LocalCluster of processes, or an existing
    scheduler)."""
    from dask.distributed import as_completed

    from pipeline.cluster import dask_cluster

    with dask_cluster(cfg.workers, cfg.scheduler, gpu=device.type == "cuda") as cluster:
        # An external scheduler's workers keep their own torch threads (0); a local cluster splits
        # the cores.
        spec.torch_threads = 0 if cfg.scheduler else cluster.torch_threads
        per_task = max(1, math.ceil(len(tasks) / (cluster.workers * 4)))
        chunks = [tasks[i : i + per_task] for i in range(0, len(tasks), per_task)]
        specs = [WorkSpec(**{**spec.__dict__, "tasks": c}) for c in chunks]
        futures = cluster.client.map(
            run_worker_tasks, specs, pure=False, resources=cluster.resources
        )
        for fut in as_completed(futures):
            for _, rows in fut.result():
                bar.update(rows)
