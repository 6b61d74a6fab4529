"""Dask beyond ``LocalCluster``: a real ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1 (the venv's ``dask`` command, as a team starts them by hand), driven by the real CLI's
``cache-logits --scheduler`` and ``sweep --scheduler``.

- the cache the workers write is bit-identical to a single-process one;
- a worker SIGKILLed while it holds shards costs only recomputation: the scheduler gives its work to
  the other worker, the job completes, ``cache verify`` passes and the cache is bit-identical;
- with an ``s3://`` cache (a real moto server) the workers read the cache from the bucket, not
  from a shared directory.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.caches import assert_same_cache, done_count, teacher_cache
from tests.helpers.data import write_npz
from tests.helpers.process import REPO, free_port, run, subprocess_env
from tests.helpers.process import cli_command as cli
from tests.helpers.s3 import S3_BUCKET

N_ROWS = 20000
ROWS_PER_SHARD = 250
N_SHARDS = N_ROWS // ROWS_PER_SHARD
CACHE_ARGS = ["--rows-per-shard", str(ROWS_PER_SHARD), "--batch-size", "250", "--device", "cpu"]
SWEEP_ARGS = ["--student", "mlp:16", "--epochs", "2", "--batch-size", "64", "--device", "cpu"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


def dask_command() -> str:
    """The ``dask`` console script of this interpreter's environment."""
    return str(Path(sys.executable).with_name("dask"))


class DaskProcesses:
    """A ``dask scheduler`` and ``workers`` ``dask worker`` processes on 127.0.0.1 (random free
    ports, one thread each, no nanny: a SIGKILLed worker is gone for good, as when its machine
    dies). Their logs go to files under ``root``; :meth:`close` ends every process started."""

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        env = subprocess_env()
        self._start(
            "scheduler",
            [dask_command(), "scheduler", "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--no-dashboard"],
            env,
        )
        for i in range(workers):
            self._start(
                f"w{i}",
                [dask_command(), "worker", self.address, "--name", f"w{i}", "--nthreads", "1"]
                + ["--no-nanny", "--no-dashboard", "--host", "127.0.0.1"]
                + ["--local-directory", str(root / f"w{i}"), "--death-timeout", "120"],
                env,
            )
        from dask.distributed import Client

        self.client = Client(self.address, timeout=120)
        self.client.wait_for_workers(workers, timeout=180)

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()  # the child holds its own descriptor

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def worker_names(self) -> dict[str, str]:
        """Worker address -> name (``w0``, ``w1``) as the scheduler knows them now."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {addr: str(w.get("name")) for addr, w in info.items()}

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            for p in self.procs.values():
                if p.poll() is None:
                    p.terminate()
            for p in self.procs.values():
                try:
                    # A worker whose scheduler is gone can linger in its own shutdown; nothing is
                    # left to save, so it is killed after a few seconds (20 s cost 40 s a run).
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator:
    """A scheduler and two workers for the module's tests that do not kill any. Started after the
    S3 server, so the workers inherit the AWS variables that point at it."""
    cluster = DaskProcesses(tmp_path_factory.mktemp("dask"), workers=2)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def rows_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 20000-row labeled set of the conftest task (80 shards of 250 rows)."""
    path = write_npz(tmp_path_factory.mktemp("rows") / "rows.npz", n_train=N_ROWS, n_test=10)
    return f"npz:{path}:train"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, rows_spec: str) -> Path:
    """The same cache written by one process (no dask), one torch thread."""
    import torch

    out = tmp_path_factory.mktemp("single") / "single.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher_cache(teacher_dir, rows_spec, out, batch_size=250, rows_per_shard=ROWS_PER_SHARD)
    finally:
        torch.set_num_threads(threads)
    return out


def cache_cmd(teacher: Path, spec: str, out: Path | str, scheduler: str) -> list[str]:
    return cli(
        "cache-logits",
        "--teacher",
        str(teacher),
        "--dataset",
        spec,
        "--out",
        str(out),
        "--quiet",
        "--scheduler",
        scheduler,
        *CACHE_ARGS,
    )


# ------------------------------------------------------------------------------------- cache-logits
def test_cache_logits_on_a_real_scheduler_is_bit_identical(
    real_cluster: DaskProcesses, teacher_dir: Path, rows_spec: str, single: Path, tmp_path: Path
) -> None:
    out = tmp_path / "dist.zarr"
    res = run(cache_cmd(teacher_dir, rows_spec, out, real_cluster.address))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{N_SHARDS} shards computed" in res.stdout
    assert_same_cache(out, single)
    # Both workers computed shards: the work really was spread over the two processes.
    for name in ("w0", "w1"):
        assert real_cluster.procs[name].poll() is None
    verify = run(cli("cache", "verify", str(out), "--dataset", rows_spec))
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow  # ~20 s here: its own scheduler and workers
def test_a_worker_killed_mid_run_costs_only_recomputation(
    tmp_path: Path, teacher_dir: Path, rows_spec: str, single: Path
) -> None:
    """SIGKILL the worker that holds shards as soon as the first shards are flagged done; the
    scheduler hands its shards to the other worker and the cache completes, verifies and equals
    the single-process one bit for bit."""
    (tmp_path / "cluster").mkdir()
    cluster = DaskProcesses(tmp_path / "cluster", workers=2)
    out = tmp_path / "killed.zarr"
    try:
        p = subprocess.Popen(
            cache_cmd(teacher_dir, rows_spec, out, cluster.address),
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        victim = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            done = done_count(out) or 0
            busy = [a for a, keys in cluster.client.processing().items() if keys]
            if done >= 1 and busy:
                names = cluster.worker_names()
                victim = names[busy[0]]
                done_at_kill = done
                cluster.procs[victim].send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        assert victim is not None, "the run ended before a worker could be killed mid-way"
        assert cluster.procs[victim].wait(timeout=30) == -signal.SIGKILL
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
        # The kill landed mid-run: shards were still missing when it did.
        assert done_at_kill < 2 * N_SHARDS
        assert f"{N_SHARDS} shards computed" in output
        assert list(cluster.worker_names().values()) == [n for n in ("w0", "w1") if n != victim]
    finally:
        cluster.close()
    assert not list(out.rglob("*.partial")), "temporary files of the killed worker were left"
    verify = run(cli("cache", "verify", str(out), "--dataset", rows_spec))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert_same_cache(out, single)
    print(f"killed {victim} with {done_at_kill}/{2 * N_SHARDS} member-shards done")


# -------------------------------------------------------------------------------------------- sweep
def sweep_results(out: Path) -> dict[str, dict]:
    return {r["setting"]: r for r in json.loads((out / "results.json").read_text())}


def test_sweep_on_a_real_scheduler_matches_an_in_process_sweep(
    real_cluster: DaskProcesses, cache_path: Path, tmp_path: Path
) -> None:
    grid = ["--cache", str(cache_path), "-T", "2,8", "--alpha", "0.9", *SWEEP_ARGS]
    dist = run(
        cli("sweep", *grid, "--scheduler", real_cluster.address, "--out", str(tmp_path / "d"))
    )
    assert dist.returncode == 0, dist.stdout + dist.stderr
    here = run(cli("sweep", *grid, "--workers", "0", "--out", str(tmp_path / "h")))
    assert here.returncode == 0, here.stdout + here.stderr
    got, want = sweep_results(tmp_path / "d"), sweep_results(tmp_path / "h")
    assert sorted(got) == sorted(want) and len(got) == 2
    for name, row in got.items():
        assert row["status"] == "ok", row
        # One torch thread on both sides: the same arithmetic, the same student.
        assert row["test_errors"] == want[name]["test_errors"], name
        assert row["test_nll"] == pytest.approx(want[name]["test_nll"], rel=1e-6), name


@pytest.mark.slow  # ~20 s here: a cache copy to S3 and two sweeps
def test_sweep_over_an_s3_cache_on_a_real_scheduler(
    real_cluster: DaskProcesses, s3_server: str, cache_path: Path, tmp_path: Path
) -> None:
    """The workers open the cache from the bucket: the run records the s3:// location and the same
    cache fingerprint as the local copy, and trains the same students."""
    url = f"s3://{S3_BUCKET}/dask-sweep/task.zarr"
    copy = run(cli("cache", "copy", str(cache_path), url))
    assert copy.returncode == 0, copy.stdout + copy.stderr
    grid = ["-T", "4", "--alpha", "0.9,1", *SWEEP_ARGS]
    s3 = run(
        cli("sweep", "--cache", url, *grid, "--scheduler", real_cluster.address)
        + ["--out", str(tmp_path / "s3")]
    )
    assert s3.returncode == 0, s3.stdout + s3.stderr
    local = run(
        cli("sweep", "--cache", str(cache_path), *grid, "--workers", "0")
        + ["--out", str(tmp_path / "local")]
    )
    assert local.returncode == 0, local.stdout + local.stderr
    got, want = sweep_results(tmp_path / "s3"), sweep_results(tmp_path / "local")
    assert sorted(got) == sorted(want) and len(got) == 2
    for name, row in got.items():
        assert row["status"] == "ok", row
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert metrics["cache"]["location"] == url
        assert row["test_errors"] == want[name]["test_errors"], name
    assert np.isfinite([r["test_nll"] for r in got.values()]).all()
