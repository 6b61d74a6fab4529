"""``train-student`` under the real ``torchrun`` (``--standalone``, two processes, gloo on the CPU),
started the way a user starts it, against a single-process run of the same global batch.

Checked: every row exactly once per epoch across the ranks (the ``KD_RECORD_ROWS`` hook saves
each rank's row numbers), the run directory written by rank 0 alone and each of its files once
(a ``sitecustomize`` audit hook in the launched processes logs every write, rename and mkdir
under the run directory, per rank), the world size and effective batch recorded, and the final
test metrics within a stated tolerance of the single-process run.

Tolerance: in memory, step j of the two ranks together trains on exactly the rows of a single
process's batch j at ``--batch-size 2B`` (pipeline.distributed.batch_spans), so the runs differ
only by float summation order (DDP averages two means of B rows instead of one mean of 2B):
test errors within 1 % of the 300 test rows (3) and NLL within 1 % relative. Streamed, ranks
read other shard runs and shuffle their own buffers, so only "a comparable student" holds there:
errors within 5 % of the test rows.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.helpers.caches import teacher_cache
from tests.helpers.data import write_npz
from tests.helpers.process import run
from tests.helpers.s3 import S3_BUCKET
from tests.helpers.torchrun import TORCHRUN, env, rows_per_epoch, single, torchrun

COMMON = ["--student", "mlp:16", "-T", "4", "--alpha", "0.9", "--device", "cpu", "--quiet"]
EPOCHS = 3


def run_ddp(tmp: Path, cache: str, run: Path, *extra: str) -> dict:
    """Train under torchrun with the hooks on; check rows, writers and the record; metrics."""
    rows, watch = tmp / "rows", tmp / "watch"
    watch.mkdir(parents=True, exist_ok=True)
    res = torchrun(
        tmp,
        ["train-student", "--cache", cache, *COMMON, "--epochs", str(EPOCHS)]
        + ["--batch-size", "32", "--out", str(run), *extra],
        KD_RECORD_ROWS=str(rows),
        KD_TEST_WATCH=str(run),
        KD_TEST_WATCH_LOG=str(watch),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(f"wrote {run}") == 1  # printed by rank 0 only
    metrics = json.loads((run / "metrics.json").read_text())
    n = metrics["cache"]["rows_used"]
    sizes = rows_per_epoch(rows, n, EPOCHS)
    assert all(abs(a - b) <= 1 for a, b in sizes)  # balanced shares
    # Rank 0 alone wrote the run directory; each result file was put in place once (history.csv
    # once per epoch, as on one process).
    assert (watch / "rank1.log").read_text() == ""
    log = (watch / "rank0.log").read_text().splitlines()
    renamed = [line.split()[-1] for line in log if line.startswith("os.rename")]
    names = sorted(Path(p).name for p in renamed)
    assert names == sorted(
        ["config.json", "config.toml", "student.pt", "metrics.json"] + ["history.csv"] * EPOCHS
    )
    assert sorted(p.name for p in run.iterdir()) == sorted({*names, "metrics.jsonl"})
    want = {"world_size": 2, "backend": "gloo", "batch_size_per_rank": 32}
    assert json.loads((run / "config.json").read_text())["distributed"] == {
        **want,
        "effective_batch_size": 64,
    }
    assert metrics["config"]["distributed"]["effective_batch_size"] == 64
    assert metrics["metrics"]["distributed"]["world_size"] == 2
    return metrics


def test_two_ranks_train_like_one_process_with_the_same_global_batch(
    cache_path: Path, tmp_path: Path
) -> None:
    ddp = run_ddp(tmp_path, str(cache_path), tmp_path / "ddp")
    one = single(
        tmp_path,
        ["train-student", "--cache", str(cache_path), *COMMON, "--epochs", str(EPOCHS)]
        + ["--batch-size", "64", "--out", str(tmp_path / "one")],
    )
    assert one.returncode == 0, one.stdout + one.stderr
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert ddp["cache"]["loader"]["mode"] == "memory"
    got, want = ddp["metrics"]["test"], ref["metrics"]["test"]
    print(f"test errors: 2 ranks x 32 {got['errors']}, 1 process x 64 {want['errors']}")
    print(f"NLL: 2 ranks {got['nll']:.6f}, 1 process {want['nll']:.6f}")
    assert abs(got["errors"] - want["errors"]) <= 3  # 1 % of 300 test rows
    assert got["nll"] == pytest.approx(want["nll"], rel=0.01)
    assert "distributed" not in ref["config"]  # one process records what it always did
    assert ddp["metrics"]["epochs"] == ref["metrics"]["epochs"] == EPOCHS


@pytest.fixture(scope="module")
def stream_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """5000 rows in shards of 256 (the last 136): over 1 MiB in memory mode, so a 1 MiB budget
    streams it."""

    root = tmp_path_factory.mktemp("stream")
    npz = write_npz(root / "big.npz", n_train=5000)
    out = root / "big.zarr"
    teacher_cache(teacher_dir, f"npz:{npz}:train", out, rows_per_shard=256)
    return out


@pytest.mark.slow  # ~40 s here: three torchrun jobs and a reference run
def test_two_ranks_stream_from_every_cache_location(
    stream_cache: Path, s3_server: str, tmp_path: Path
) -> None:
    """Streamed from a directory, a .zarr.zip bundle and s3:// (moto): rows once per epoch, the
    same student from every location, close to one process's."""
    bundle = tmp_path / "big.zarr.zip"
    url = f"s3://{S3_BUCKET}/ddp/big.zarr"
    for dst in (bundle, url):
        res = single(tmp_path, ["cache", "copy" if dst == url else "pack", str(stream_cache), dst])
        assert res.returncode == 0, res.stdout + res.stderr
    results = {}
    for name, where in (("dir", str(stream_cache)), ("zip", str(bundle)), ("s3", url)):
        m = run_ddp(tmp_path / name, where, tmp_path / name / "run", "--memory-budget", "1MiB")
        assert m["cache"]["loader"]["mode"] == "stream"
        results[name] = m["metrics"]["test"]
    assert results["dir"] == results["zip"] == results["s3"]
    one = single(
        tmp_path,
        ["train-student", "--cache", str(stream_cache), *COMMON, "--epochs", str(EPOCHS)]
        + ["--batch-size", "64", "--memory-budget", "1MiB", "--out", str(tmp_path / "one")],
    )
    assert one.returncode == 0, one.stdout + one.stderr
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]["test"]
    print(f"streamed test errors: 2 ranks {results['dir']['errors']}, 1 process {ref['errors']}")
    assert abs(results["dir"]["errors"] - ref["errors"]) <= 15  # 5 % of 300 test rows


def test_ranks_that_disagree_are_refused_with_one_message(tmp_path: Path) -> None:
    """Two real ranks (torchrun, gloo) holding different facts: both stop with the message."""
    script = tmp_path / "disagree.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, torch
            from pipeline.distributed import agree, process_group
            from pipeline.errors import DistributedError

            with process_group(torch.device("cpu")) as ranks:
                try:
                    agree(ranks, {"cache": "a", "rows": 600 + ranks.rank})
                except DistributedError as e:
                    print(f"rank {ranks.rank}: {e}")
            """
        )
    )
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script)]
    res = run(cmd, timeout=120, env=env(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    want = (
        "the 2 processes of this torchrun job disagree: rank 0 has rows=600, rank 1 has "
        "rows=601; start every rank with the same command, cache and dataset"
    )
    assert f"rank 0: {want}" in res.stdout and f"rank 1: {want}" in res.stdout


@pytest.mark.slow  # a start-up cost for a check tests/pipeline/test_distributed.py also makes
def test_cache_logits_under_torchrun_is_refused(
    teacher_dir: Path, npz_path: Path, tmp_path: Path
) -> None:
    res = torchrun(
        tmp_path,
        ["cache-logits", "--teacher", str(teacher_dir), "--dataset", f"npz:{npz_path}:train"]
        + ["--out", str(tmp_path / "c.zarr")],
    )
    assert res.returncode != 0
    assert (
        "cache-logits runs under torchrun with WORLD_SIZE=2, but only train-student trains on "
        "several processes" in res.stdout + res.stderr
    )
    assert not (tmp_path / "c.zarr").exists()
