"""``kd-pipeline cache-logits`` and ``kd-pipeline cache info`` end to end: the real CLI in real
subprocesses (SIGKILLed at random moments and resumed), a real dask LocalCluster of processes, and
click's CliRunner.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline.cache.config import CacheConfig
from pipeline.cache.header import ATTR_KEY
from pipeline.cache.lock import CacheLock
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError
from stages.cli import main
from tests.helpers.caches import assert_same_cache, done_count
from tests.helpers.data import make_image_task, write_npz
from tests.helpers.process import cli_command, run, start, wait_for_path

N_BIG = 20000
BIG_ARGS = ["--rows-per-shard", "500", "--batch-size", "250", "--device", "cpu"]
N_SHARDS = N_BIG // 500

# pytest resets the warning filters pipeline.cache installs; these two are expected and harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


# ------------------------------------------------------------------------------------------ helpers
def cli_cmd(teacher: Path, dataset: str, out: Path, *extra: str) -> list[str]:
    return cli_command(
        "cache-logits",
        "--teacher",
        str(teacher),
        "--dataset",
        dataset,
        "--out",
        str(out),
        "--quiet",
        *BIG_ARGS,
        *extra,
    )


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def big_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 20000-row labeled set of the same task as ``npz_path`` (same class prototypes)."""
    return (
        f"npz:{write_npz(tmp_path_factory.mktemp('big') / 'big.npz', n_train=N_BIG, n_test=10)}"
        ":train"
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, big_spec: str) -> dict:
    """An uninterrupted run over the big set (in this process, one torch thread like the CLI runs
    below), and how long its compute phase took."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    marks: dict[str, float] = {}

    def log(line: str) -> None:
        if "shards to compute" in line:
            marks["line"] = time.perf_counter()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = build_cache(
            CacheConfig(
                teachers=[str(teacher_dir)],
                dataset=big_spec,
                out=str(out),
                device="cpu",
                batch_size=250,
                rows_per_shard=500,
            ),
            log=log,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert res.status == "created" and res.shards_computed == N_SHARDS
    return {"path": out, "t_compute": max(time.perf_counter() - marks["line"], 0.2)}


# --------------------------------------------------------------------------------------- 4. SIGKILL
def kill_and_resume(
    root: Path,
    teacher: Path,
    spec: str,
    ref: dict,
    kills: int,
    seed: int,
    min_partial: int = 0,
    max_kills: int = 0,
) -> dict:
    """SIGKILL the real CLI ``kills`` times at seeded random moments, resuming each time; finish and
    verify.

    On a fresh cache, half the runs are killed at a random moment just after the cache directory
    appears (taking the lock, writing the schema, ids and labels). Of the rest, a quarter land at a
    random moment late in start-up (loading teachers and data, reading the header, taking over the
    stale lock); the others wait for the "N/S shards to compute" line and land at a random point of
    the estimated remaining compute (inference, the writer thread mid-chunk, done flags,
    completion). When a run completes before its kill, its cache is verified and a fresh cache is
    started, so that every kill hits a run with work left. Every cache is finally compared with the
    uninterrupted ``ref``.

    Where a kill lands depends on this machine's speed and load, so after ``kills`` kills it goes
    on killing (up to ``max_kills``) until ``min_partial`` of them have left a cache with some
    but not all shards done: the kills that really interrupt writing are what the test is for.
    """
    rng = random.Random(seed)
    stats = {
        "kills": 0,
        "partial_after_kill": 0,
        "early": 0,
        "creating": 0,
        "launches": 0,
        "caches": [],
    }
    t_line = None  # how long the CLI takes to reach its plan line (measured on the runs below)
    cache = None

    def more() -> bool:
        if stats["kills"] < kills:
            return True
        return stats["partial_after_kill"] < min_partial and stats["kills"] < max_kills

    while more():
        if cache is None:
            cache = root / f"c{len(stats['caches'])}.zarr"
            stats["caches"].append(cache)
        t0 = time.perf_counter()
        p = start(
            cli_cmd(teacher, spec, cache),
        )
        stats["launches"] += 1
        lines: list[str] = []
        early = t_line is not None and rng.random() < 0.25
        if not cache.exists() and rng.random() < 0.5:
            # A fresh cache: kill while it is being created (lock, schema, ids, labels, member
            # arrays).
            stats["creating"] += wait_for_path(cache, p) and 1
            time.sleep(rng.uniform(0.0, 0.15))
        elif early:
            time.sleep(rng.uniform(0.7, 1.05) * t_line)
        else:
            for (
                line
            ) in p.stdout:  # until the plan line, or EOF when the run ends (complete / error)
                lines.append(line)
                if "shards to compute" in line:
                    t_line = time.perf_counter() - t0
                    todo = int(re.search(r": (\d+)/\d+ shards to compute", line).group(1))
                    time.sleep(rng.uniform(0.0, ref["t_compute"] * todo / N_SHARDS + 0.05))
                    break
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
        lines += p.stdout.readlines()
        p.stdout.close()
        if rc == -signal.SIGKILL:
            stats["kills"] += 1
            stats["early"] += early
            n_done = done_count(cache)
            if n_done is not None and 0 < n_done < 2 * N_SHARDS:
                stats["partial_after_kill"] += 1
            continue
        # It finished before the kill: it must have succeeded (whatever the earlier kills left), and
        # be whole.
        assert rc == 0, f"run on {cache} failed after earlier kills:\n{''.join(lines)}"
        assert_same_cache(cache, ref["path"])
        cache = None
    if cache is not None:  # the last one was killed: resume it to completion
        done = run(cli_cmd(teacher, spec, cache), timeout=180)
        stats["launches"] += 1
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{cache} complete" in done.stdout or "already complete" in done.stdout
    for c in stats["caches"]:
        assert_same_cache(c, ref["path"])
        cache = LogitCache(c)  # the reader agrees: complete, every row once, with its label
        assert cache.complete and cache.done_shards().tolist() == list(range(N_SHARDS))
        ids = cache.read_ids()
        assert np.array_equal(ids, np.arange(N_BIG)) and np.unique(ids).size == N_BIG
        assert np.array_equal(cache.read_labels(), load_dataset(spec).y)
        assert cache.header.command.startswith("kd-pipeline cache-logits --teacher ")
        assert not list(c.rglob("*.partial")), "temporary files left behind"
        assert not list(c.glob("kd-*")), "the writer lock or the creation marker was left behind"
    print(
        "kill stats:",
        {k: v for k, v in stats.items() if k != "caches"},
        "caches:",
        len(stats["caches"]),
    )
    return stats


def test_sigkill_at_random_moments_then_resume_is_bit_identical(
    tmp_path: Path, teacher_dir: Path, big_spec: str, reference: dict
) -> None:
    stats = kill_and_resume(
        tmp_path,
        teacher_dir,
        big_spec,
        reference,
        kills=10,
        seed=20240611,
        min_partial=2,
        max_kills=40,
    )
    assert stats["kills"] >= 10
    # The kills really did interrupt writing, not only start-up.
    assert stats["partial_after_kill"] >= 2, stats


@pytest.mark.slow
def test_sigkill_many_times_then_resume_is_bit_identical(
    tmp_path: Path, teacher_dir: Path, big_spec: str, reference: dict
) -> None:
    stats = kill_and_resume(
        tmp_path, teacher_dir, big_spec, reference, kills=30, seed=7, min_partial=6, max_kills=80
    )
    assert stats["kills"] >= 30
    assert stats["partial_after_kill"] >= 6, stats


# ---------------------------------------------------------------------------- 10. concurrent writer
def test_second_writer_is_refused_while_the_first_runs(
    tmp_path: Path, teacher_dir: Path, big_spec: str
) -> None:
    """A real writer, frozen (SIGSTOP) mid-compute on a cache it just created, still holds the
    lock.
    """
    out = tmp_path / "c.zarr"
    p = start(
        cli_cmd(teacher_dir, big_spec, out, "--batch-size", "50"),
    )
    try:
        for line in p.stdout:
            if "shards to compute" in line:
                break
        p.send_signal(signal.SIGSTOP)
        lock = out / CacheLock.NAME
        assert lock.exists(), "the first writer does not hold the writer lock"
        assert json.loads(lock.read_text())["pid"] == p.pid
        cfg = CacheConfig(
            teachers=[str(teacher_dir)],
            dataset=big_spec,
            out=str(out),
            device="cpu",
            batch_size=250,
            rows_per_shard=500,
        )
        with pytest.raises(
            CacheError, match=f"another process is writing this cache \\(pid {p.pid} "
        ):
            build_cache(cfg, log=lambda s: None, progress=False)
        result = CliRunner().invoke(
            main,
            [
                "cache-logits",
                "--teacher",
                str(teacher_dir),
                "--dataset",
                big_spec,
                "--out",
                str(out),
                "--quiet",
                *BIG_ARGS,
            ],
        )
        assert result.exit_code == 2 and f"pid {p.pid}" in result.output
    finally:
        p.send_signal(signal.SIGCONT)
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 0, rest
    p.stdout.close()
    assert LogitCache(out).complete and not (out / CacheLock.NAME).exists()


# ---------------------------------------------------------------------------------- 7. dask workers
def test_workers_cache_is_bit_identical_to_single_process(
    tmp_path: Path, teacher_dir: Path, big_spec: str
) -> None:
    runner = CliRunner()
    args = [
        "cache-logits",
        "--teacher",
        str(teacher_dir),
        "--dataset",
        big_spec,
        "--quiet",
        *BIG_ARGS,
    ]
    single = runner.invoke(main, [*args, "--out", str(tmp_path / "single.zarr")])
    assert single.exit_code == 0, single.output
    dist = runner.invoke(main, [*args, "--out", str(tmp_path / "dist.zarr"), "--workers", "2"])
    assert dist.exit_code == 0, dist.output
    assert f"{N_SHARDS} shards computed" in dist.output
    assert_same_cache(tmp_path / "dist.zarr", tmp_path / "single.zarr")
    # And a distributed resume of a partial cache fills exactly the missing shards, identically.
    part = tmp_path / "dist.zarr"
    g = zarr.open_group(str(part), mode="r+", use_consolidated=False)
    g.attrs[ATTR_KEY] = {**g.attrs[ATTR_KEY], "complete": False}
    for rel in ("members/0/done/c/5", "members/1/done/c/5", "members/1/done/c/39"):
        (part / rel).unlink()
    (part / "members/0/logits/c/5/0").unlink()
    again = runner.invoke(main, [*args, "--out", str(part), "--workers", "2"])
    assert again.exit_code == 0, again.output
    assert "resumed" in again.output and "2 shards computed" in again.output
    assert_same_cache(part, tmp_path / "single.zarr")


# ------------------------------------------------------------------------------------ 8. cache info
@pytest.fixture(scope="module")
def small_cache(
    tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, npz_path: Path
) -> Path:
    out = tmp_path_factory.mktemp("info") / "small.zarr"
    result = CliRunner().invoke(
        main,
        [
            "cache-logits",
            "--teacher",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz_path}:train",
            "--out",
            str(out),
            "--rows-per-shard",
            "64",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "complete: 600 rows x 5 classes x 2 member(s), 10 shards computed" in result.output
    assert f"next: kd-pipeline cache info {out}" in result.output
    return out


def test_cache_info_text(small_cache: Path) -> None:
    result = CliRunner().invoke(main, ["cache", "info", str(small_cache)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "status     complete: 10/10 shards done by every member (64 rows per shard)" in out
    assert "rows       600  (labeled)" in out
    assert "classes    5: 0, 1, 2, 3, 4" in out
    assert "dtype      float16  codecs bytes(little-endian) -> zstd(level=3) -> crc32c" in out
    assert "members    2" in out
    assert "[0] mlp:32" in out and "[1] mlp:32" in out and "member-1.pt" in out


def test_cache_info_json(small_cache: Path, teacher_dir: Path, npz_path: Path) -> None:
    from pipeline.checkpoints import file_sha256

    result = CliRunner().invoke(main, ["cache", "info", str(small_cache), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["n"] == 600 and info["num_classes"] == 5 and info["n_shards"] == 10
    assert info["complete"] is True and info["dtype"] == "float16" and info["labeled"] is True
    assert info["shards_done"] == list(range(10)) and len(info["shards_done"]) == info["n_shards"]
    assert [m["checkpoint_sha256"] for m in info["members"]] == [
        file_sha256(teacher_dir / f"member-{i}.pt") for i in range(2)
    ]
    size = sum(f.stat().st_size for f in small_cache.rglob("*") if f.is_file())
    assert info["size_on_disk"] == size > 0
    assert info["raw_float32_size"] == 600 * 5 * 4 * 2
    assert info["dataset"]["fingerprint"] == load_dataset(f"npz:{npz_path}:train").fingerprint


def test_cache_info_on_partial_cache(small_cache: Path, tmp_path: Path) -> None:
    import shutil

    part = tmp_path / "part.zarr"
    shutil.copytree(small_cache, part)
    g = zarr.open_group(str(part), mode="r+", use_consolidated=False)
    g.attrs[ATTR_KEY] = {**g.attrs[ATTR_KEY], "complete": False}
    (part / "members/1/done/c/6").unlink()
    result = CliRunner().invoke(main, ["cache", "info", str(part)])
    assert result.exit_code == 0, result.output
    assert "status     PARTIAL: 9/10 shards done by every member" in result.output
    info = json.loads(CliRunner().invoke(main, ["cache", "info", str(part), "--json"]).output)
    assert (
        info["complete"] is False and 6 not in info["shards_done"] and len(info["shards_done"]) == 9
    )


def test_cache_info_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2
    assert (
        "error:" in result.output
        and "no such cache" in result.output
        and "Traceback" not in result.output
    )


def test_cli_refuses_other_dataset_with_exit_2(
    small_cache: Path, teacher_dir: Path, npz_path: Path
) -> None:
    result = CliRunner().invoke(
        main,
        [
            "cache-logits",
            "--teacher",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz_path}:train:fraction=0.5",
            "--out",
            str(small_cache),
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert "already holds a different cache" in result.output and "fingerprint" in result.output
    again = CliRunner().invoke(
        main,
        [
            "cache-logits",
            "--teacher",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz_path}:train",
            "--out",
            str(small_cache),
            "--quiet",
        ],
    )
    assert (
        again.exit_code == 0 and "already complete" in again.output and "next:" not in again.output
    )


@pytest.mark.parametrize("bad", [-1, 5])
def test_labels_that_are_not_classes_are_refused_before_any_work(
    teacher_dir: Path, tmp_path: Path, bad: int
) -> None:
    """An npz whose labels fall outside 0..C-1 used to be cached, then to break train-student and
    evaluate with an IndexError; every command refuses it when it loads it."""
    x, y = make_image_task(100, seed=3, classes=5)
    y[[7, 40]] = bad
    npz = tmp_path / "bad.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=x, y_test=y, num_classes=np.int64(5))
    says = f"2 labels are outside 0..4 (sample ids [7, 40] have [{bad}, {bad}])"
    out = tmp_path / "bad.zarr"
    runs = {
        "cache-logits": [
            "--teacher",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz}:train",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
        "train-student": [
            "--online-teacher",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz}:train",
            "--student",
            "mlp:8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
        ],
        "evaluate": [
            "--model",
            str(teacher_dir),
            "--dataset",
            f"npz:{npz}:test",
            "--device",
            "cpu",
        ],
    }
    for command, args in runs.items():
        result = CliRunner().invoke(main, [command, *args])
        assert result.exit_code == 2, (command, result.output)
        assert says in result.output and "Traceback" not in result.output, (command, result.output)
    assert not out.exists() and not (tmp_path / "run").exists()


def test_cache_info_on_a_directory_that_is_not_a_cache_says_so(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a cache")
    result = CliRunner().invoke(main, ["cache", "info", str(tmp_path)])
    assert result.exit_code == 2
    # Not zarr's "GroupNotFoundError: No group found in store LocalStore('file://...')".
    assert result.output == (
        f"error: {tmp_path}: not a logit cache (no zarr.json at its root); "
        "give the directory, NAME.zarr.zip or s3:// URL that `kd-pipeline "
        "cache-logits --out` wrote\n"
    )


def _terminal_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_a_rerun_resumes_and_it_does(
    tmp_path: Path, teacher_dir: Path, big_spec: str, reference: dict
) -> None:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-compute: exit 130 with
    what to do (not click's bare "Aborted!"); the same command then resumes to the same cache."""
    # A run that finishes before the signal lands (a few seconds of work on a fast or idle
    # machine) is tried again.
    for attempt in range(8):
        out = tmp_path / f"c{attempt}.zarr"
        p = start(
            cli_cmd(teacher_dir, big_spec, out),
            start_new_session=True,
            # As a terminal's shell starts it: SIGINT neither blocked nor ignored (a mask or an
            # ignored disposition left in this test process by other tests' libraries would be
            # inherited, and the signal would never arrive).
            preexec_fn=_terminal_sigint,
        )
        seen = []
        for line in p.stdout:  # the plan line: computing has begun
            seen.append(line)
            if "shards to compute" in line:
                os.killpg(p.pid, signal.SIGINT)
                break
        rest, _ = p.communicate(timeout=120)
        output = "".join(seen) + rest
        if p.returncode == 0:
            continue
        assert p.returncode == 130, output
        assert (
            "interrupted: every finished shard is kept; re-run the same command to resume" in output
        )
        assert "Aborted!" not in output and "Traceback" not in output
        rerun = run(cli_cmd(teacher_dir, big_spec, out), timeout=180)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        # "resumed", or "created" when the signal came before the writer thread made the schema.
        assert "resumed" in rerun.stdout or "created" in rerun.stdout
        assert_same_cache(out, reference["path"])
        return
    pytest.fail("cache-logits finished eight times before SIGINT reached it")
