"""Dask clusters for the steps that fan out (cache-logits, sweep, specialists): one way to start or
join one.

A local cluster is worker *processes* with one task thread each, and torch threads per worker =
cores / workers, so workers on one machine do not oversubscribe its cores; on CUDA it is dask-cuda's
``LocalCUDACluster`` (one worker per GPU) when that package is installed. On CUDA every task asks
for a ``GPU`` resource, so a GPU runs one task at a time; with an existing scheduler only if some
worker declares one (``dask worker ... --resources GPU=1``), since otherwise no worker could ever
run the tasks.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass
class Cluster:
    client: Any  # dask.distributed.Client
    workers: int  # worker processes (the scheduler's, or those started here)
    torch_threads: int  # per worker; 0 leaves the workers' own default (an external scheduler's)
    resources: dict | None  # what each task asks for: {"GPU": 1} or None


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Start local workers that Ctrl-C does not reach; a Ctrl-C meanwhile comes after the start.

    A terminal's Ctrl-C goes to the whole process group. Worker processes that get it die at once,
    leaving their semaphores to the resource tracker ("leaked semaphore objects" at exit) and the
    start-up half done (a traceback); this process, which handles Ctrl-C by shutting the cluster
    down, is the one that should get it. SIGINT is blocked while the cluster starts: the block is
    inherited by the worker processes and the cluster's event-loop thread (which starts workers
    again later), and this thread gets a Ctrl-C pressed meanwhile as soon as it is unblocked.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):
        yield
        return
    from multiprocessing import resource_tracker

    # Started now, not inside the block: starting it unblocks SIGINT in this thread afterwards
    # (bpo-33613), which would undo the block for every thread and worker made after it.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def local_cluster_class(workers: int, gpu: bool) -> type:
    """``dask_cuda.LocalCUDACluster`` for ``workers`` CUDA workers when dask-cuda is installed and
    there are that many GPUs, else ``dask.distributed.LocalCluster``.

    LocalCUDACluster gives each worker process its own ``CUDA_VISIBLE_DEVICES`` (one GPU each, seen
    as ``cuda:0``) and pins it near that GPU's CPUs and NICs; it refuses more workers than GPUs, so
    more workers than GPUs (GPUs shared through the ``GPU`` resource) stay on a plain LocalCluster.
    """
    from dask.distributed import LocalCluster

    if not gpu:
        return LocalCluster
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:  # optional: the project does not depend on it
        return LocalCluster
    import torch

    return LocalCUDACluster if workers <= torch.cuda.device_count() else LocalCluster


@contextmanager
def dask_cluster(
    workers: int,
    scheduler: str | None = None,
    gpu: bool = False,
    torch_threads: int = 0,
    quiet_workers: bool = False,
) -> Iterator[Cluster]:
    """Join ``scheduler``, or start a ``LocalCluster`` of ``workers`` processes; closed on exit.

    Args:
        gpu: tasks run on CUDA (each asks for a GPU resource, see the module docstring).
        torch_threads: torch threads per worker; 0 = cores / workers on a local cluster.
        quiet_workers: show only errors from local workers (e.g. no warnings about tasks cancelled
            by a Ctrl-C).
    """
    from dask.distributed import Client

    local = None
    if scheduler:
        client = Client(scheduler)
        info = client.scheduler_info().get("workers", {})
        n = max(1, len(info))
        gpu = gpu and any("GPU" in (w.get("resources") or {}) for w in info.values())
    else:
        n = workers
        # dashboard ":0": a free port; None still binds the default 8787 and warns when another
        # cluster holds it.
        with _sigint_deferred():
            kind = local_cluster_class(n, gpu)
            # LocalCUDACluster is always processes and takes no ``processes`` argument.
            procs = {} if kind.__name__ == "LocalCUDACluster" else {"processes": True}
            local = kind(
                n_workers=n,
                threads_per_worker=1,
                dashboard_address=":0",
                resources={"GPU": 1} if gpu else None,
                silence_logs=logging.ERROR if quiet_workers else logging.WARNING,
                **procs,
            )
            client = Client(local)
        torch_threads = torch_threads or max(1, (os.cpu_count() or 1) // n)
    try:
        yield Cluster(client, n, torch_threads, {"GPU": 1} if gpu else None)
    finally:
        client.close()
        if local is not None:
            local.close()
