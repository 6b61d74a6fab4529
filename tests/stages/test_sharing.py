"""Sharing caches end to end against a real S3 API (moto's server on 127.0.0.1):
``cache-logits --out s3://``, ``cache verify | pack | copy | ls``, ``train-student --cache s3://``
and ``.zarr.zip``, the writer lease, and hostile bundles. Real teachers (``teacher_dir``), real
stores, bit-for-bit comparisons.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import boto3
import numpy as np
import pytest
import zarr

from pipeline.cache import copying, listing, reports, verify
from pipeline.cache.config import CacheConfig
from pipeline.cache.location import open_store
from pipeline.cache.lock import CacheLock, StoreLease
from pipeline.cache.lookup import read_header
from pipeline.cache.read import LogitCache
from pipeline.cache.store_keys import get_bytes, key_sizes
from pipeline.cache.writer import build_cache
from pipeline.errors import CacheError, StorageError
from tests.helpers.caches import raw_arrays, teacher_cache
from tests.helpers.cli import cli
from tests.helpers.damage import damaged, edit_header, relabel, remove, write
from tests.helpers.data import make_image_task, write_npz
from tests.helpers.process import REPO
from tests.helpers.s3 import S3_BUCKET, s3_url

RPS = "64"
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


def all_objects(location: str | Path) -> dict[str, bytes]:
    """Every object of a cache (writer bookkeeping excluded), raw bytes by key."""
    store = open_store(location, "r")
    return {
        k: get_bytes(store, k)
        for k in key_sizes(store)
        if not k.rsplit("/", 1)[-1].startswith("kd-")
    }


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3_cache(s3_server: str, teacher_dir: Path, npz_path: Path) -> str:
    """``cache-logits --out s3://...`` (the real CLI command, in process): the same cache as
    ``cache_path``."""
    url = s3_url("team/task.zarr")
    code, out = cli(
        "cache-logits",
        "--teacher",
        str(teacher_dir),
        "--dataset",
        f"npz:{npz_path}:train",
        "--out",
        url,
        "--rows-per-shard",
        RPS,
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0, out
    assert f"{url} complete: 600 rows x 5 classes x 2 member(s), 10 shards computed" in out
    return url


# --------------------------------------------------------------------------------------- end to end
def test_s3_cache_is_the_local_cache_and_verifies(s3_cache: str, cache_path: Path) -> None:
    # Written straight to the bucket, it holds exactly what the same command writes to a local
    # directory.
    a, b = raw_arrays(s3_cache), raw_arrays(cache_path)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert read_header(s3_cache).complete is True
    code, out = cli("cache", "verify", s3_cache, "--quiet")
    assert code == 0, out
    assert (
        "result     OK" in out and "read       100 chunks" in out
    )  # ids, labels, 2 x (logits, done): 10 each
    code, out = cli("cache", "info", s3_cache)
    assert code == 0 and "status     complete: 10/10 shards" in out
    # Reading never wrote: no lock, no marker, nothing new in the bucket.
    assert not [k for k in key_sizes(open_store(s3_cache)) if k.startswith("kd-")]


def test_copy_s3_to_dir_and_zip_round_trips_bit_for_bit(s3_cache: str, tmp_path: Path) -> None:
    src = all_objects(s3_cache)
    local, bundle = tmp_path / "copy.zarr", tmp_path / "copy.zarr.zip"
    code, out = cli("cache", "copy", s3_cache, str(local), "--quiet")
    assert code == 0, out
    assert f"{len(src)} objects" in out and "verified" in out
    assert all_objects(local) == src
    code, out = cli("cache", "copy", s3_cache, str(bundle), "--quiet")
    assert code == 0, out
    assert all_objects(bundle) == src
    # dir -> s3 -> dir again, and pack of the local copy: still the same bytes.
    back = s3_url("roundtrip/copy.zarr")
    assert cli("cache", "copy", str(local), back, "--quiet")[0] == 0
    assert all_objects(back) == src
    packed = tmp_path / "packed.zarr.zip"
    code, out = cli("cache", "pack", back, str(packed), "--quiet")
    assert code == 0, out
    assert all_objects(packed) == src
    with zipfile.ZipFile(packed) as z:
        assert not any(n.startswith("kd-") for n in z.namelist())
    # A re-run is a no-op that still verifies.
    code, out = cli("cache", "copy", s3_cache, str(local), "--quiet")
    assert code == 0 and f"0 objects (0.00 MiB) written, {len(src)} already there" in out


def test_train_student_from_s3_and_zip_matches_local(
    s3_cache: str, tmp_path: Path, one_torch_thread: None
) -> None:
    local = tmp_path / "local.zarr"
    bundle = tmp_path / "local.zarr.zip"
    copying.copy_cache(s3_cache, local, progress=False, log=lambda s: None)
    copying.pack_cache(local, bundle, progress=False, log=lambda s: None)
    results = {}
    for name, cache in (("s3", s3_cache), ("dir", str(local)), ("zip", str(bundle))):
        out = tmp_path / f"run-{name}"
        code, text = cli(
            "train-student",
            "--cache",
            cache,
            "--student",
            "mlp:32",
            "--batch-size",
            "64",
            "--epochs",
            "2",
            "-T",
            "4",
            "--alpha",
            "0.8",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        )
        assert code == 0, text
        results[name] = json.loads((out / "metrics.json").read_text())
    for name in ("s3", "zip"):
        for key in ("test", "teacher_agreement_transfer"):
            assert results[name]["metrics"][key] == results["dir"]["metrics"][key], (name, key)
        assert results[name]["cache"]["fingerprint"] == results["dir"]["cache"]["fingerprint"]
    assert results["s3"]["metrics"]["test"]["accuracy"] > 0.5


def test_specialists_run_from_s3_with_storage_options_and_from_a_bundle_match_local(
    s3_cache: str,
    s3_server: str,
    cache_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    """`specialists run --cache s3://... --storage-option endpoint_url=...` through the real CLI:
    the endpoint reaches the reader only through the option (the session's AWS_ENDPOINT_URL is
    removed here)."""
    bundle = tmp_path / "task.zarr.zip"
    copying.pack_cache(cache_path, bundle, progress=False, log=lambda s: None)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    runs = {}
    for name, cache, extra in (
        ("dir", str(cache_path), []),
        ("zip", str(bundle), []),
        ("s3", s3_cache, ["--storage-option", f"endpoint_url={s3_server}"]),
    ):
        out = tmp_path / f"spec-{name}"
        code, text = cli(
            "specialists",
            "run",
            "--cache",
            cache,
            "--out",
            str(out),
            "--specialists",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            *extra,
        )
        assert code == 0, text
        runs[name] = {
            f: json.loads((out / f).read_text())
            for f in ("clusters.json", "evaluation.json", "config.json")
        }
        specialist = json.loads((out / "specialists" / "0" / "specialist.json").read_text())
        assert specialist["sampling"]["rows"] > 0
    local = runs["dir"]
    assert local["evaluation.json"]["main"]["generalist"]["accuracy"] > 0.5
    assert any(len(g) >= 2 for g in local["clusters.json"]["groups"])
    for name in ("zip", "s3"):
        run = runs[name]
        assert run["clusters.json"]["groups"] == local["clusters.json"]["groups"], name
        fingerprints = (
            run["clusters.json"]["cache_fingerprint"],
            local["clusters.json"]["cache_fingerprint"],
        )
        assert fingerprints[0] == fingerprints[1]
        main_run, main_local = run["evaluation.json"]["main"], local["evaluation.json"]["main"]
        for part in ("generalist", "combined"):
            for key in ("accuracy", "errors"):
                assert main_run[part][key] == main_local[part][key], (name, part, key)
    assert runs["s3"]["clusters.json"]["cache"] == s3_cache
    assert runs["s3"]["config.json"]["storage_options"] == {"endpoint_url": s3_server}


def test_flipped_byte_in_one_s3_object_fails_verify_naming_it(
    s3_server: str, cache_path: Path
) -> None:
    url = s3_url("flip/task.zarr")
    assert cli("cache", "copy", str(cache_path), url, "--quiet")[0] == 0  # local -> s3
    key = "members/1/logits/c/3/0"
    s3 = boto3.client("s3")
    body = bytearray(s3.get_object(Bucket=S3_BUCKET, Key=f"flip/task.zarr/{key}")["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=S3_BUCKET, Key=f"flip/task.zarr/{key}", Body=bytes(body))
    code, out = cli("cache", "verify", url, "--quiet")
    assert code == 1, out
    assert f"chunk {key} is corrupt" in out and "1 PROBLEM(S)" in out
    with pytest.raises(
        CacheError, match="cannot read chunk \\(3, 0\\) of array 'members/1/logits'"
    ):
        LogitCache(url).read_logits(3)


def test_verify_checks_dataset_fingerprint_and_missing_chunks(
    cache_path: Path, npz_path: Path, tmp_path: Path
) -> None:
    code, out = cli(
        "cache", "verify", str(cache_path), "--dataset", f"npz:{npz_path}:train", "--quiet"
    )
    assert code == 0 and "matches" in out, out
    code, out = cli(
        "cache",
        "verify",
        str(cache_path),
        "--dataset",
        f"npz:{npz_path}:train:fraction=0.5",
        "--quiet",
    )
    assert code == 1 and "fingerprint" in out
    broken = tmp_path / "broken.zarr"
    copying.copy_cache(cache_path, broken, progress=False, log=lambda s: None)
    (broken / "members/0/logits/c/7/0").unlink()
    code, out = cli("cache", "verify", str(broken), "--quiet")
    assert code == 1 and "chunk members/0/logits/c/7/0 is missing" in out


def test_interrupted_copy_resumes_and_is_never_taken_for_a_cache(
    s3_cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = s3_url("interrupted/task.zarr")
    real_copy, calls = copying._copy_object, [0]

    async def dying_copy(*args) -> None:  # noqa: ANN002
        calls[0] += 1
        if calls[0] > 20:
            raise ConnectionError("network dropped")  # half-way through the copy
        await real_copy(*args)

    monkeypatch.setattr(copying, "_copy_object", dying_copy)
    with pytest.raises(StorageError, match=f"{dst}: cannot reach the storage endpoint"):
        copying.copy_cache(s3_cache, dst, progress=False, log=lambda s: None)
    monkeypatch.setattr(copying, "_copy_object", real_copy)
    # Half a copy: marked unfinished, data objects only, so no reader takes it for a cache.
    with pytest.raises(CacheError, match=f"{dst}: INCOMPLETE: an unfinished copy of {s3_cache}"):
        read_header(dst)
    assert cli("cache", "verify", dst, "--quiet")[0] == 1
    res = copying.copy_cache(s3_cache, dst, progress=False, log=lambda s: None)
    total = len(all_objects(s3_cache))
    assert res.skipped >= 16 and res.copied + res.skipped == total and res.report.ok, (
        res.copied,
        res.skipped,
    )
    assert all_objects(dst) == all_objects(s3_cache)


def test_cache_ls_lists_caches_under_a_prefix(
    s3_cache: str, tmp_path: Path, cache_path: Path, partial_cache_path: Path
) -> None:
    code, out = cli("cache", "ls", s3_url("team"))
    assert code == 0, out
    assert f"{s3_cache}  complete  members=2 (mlp:32" in out and "N=600  classes=5" in out
    assert "1 cache(s)" in out
    root = tmp_path / "shelf"
    copying.copy_cache(cache_path, root / "a.zarr", progress=False, log=lambda s: None)
    copying.copy_cache(
        partial_cache_path, root / "sub" / "b.zarr", progress=False, log=lambda s: None
    )
    copying.pack_cache(cache_path, root / "c.zarr.zip", progress=False, log=lambda s: None)
    lines = [s.line() for s in listing.list_caches(root)]
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"{root / 'a.zarr'}  complete")
    assert lines[1].startswith(f"{root / 'c.zarr.zip'}  complete")
    assert lines[2].startswith(f"{root / 'sub' / 'b.zarr'}  PARTIAL 19/20")


# ------------------------------------------------------------------------------------- hostile zips
def hostile_zip(
    tmp_path: Path, cache_path: Path, name: str, entry: str, symlink: bool = False
) -> Path:
    """A real bundle of ``cache_path`` plus one bad entry."""
    path = tmp_path / name
    copying.pack_cache(cache_path, path, progress=False, log=lambda s: None)
    with zipfile.ZipFile(path, "a") as z:
        info = zipfile.ZipInfo(entry)
        if symlink:
            info.external_attr = 0o120777 << 16
        z.writestr(info, b"/etc/passwd" if symlink else b"{}")
    return path


@pytest.mark.parametrize(
    ("entry", "symlink", "says"),
    [
        ("../evil.json", False, "contains '..'"),
        ("members/../../x", False, "contains '..'"),
        ("/etc/cron.d/x", False, "has an absolute path"),
        ("members/link", True, "is a symlink"),
    ],
)
def test_zip_with_escaping_entry_is_refused(
    tmp_path: Path, cache_path: Path, entry: str, symlink: bool, says: str
) -> None:
    bad = hostile_zip(tmp_path, cache_path, "bad.zarr.zip", entry, symlink)
    with pytest.raises(CacheError, match=f"refusing this bundle: entry '{entry}' {says}"):
        LogitCache(bad)
    code, out = cli("cache", "verify", str(bad), "--quiet")
    assert code == 1 and says in out
    code, out = cli(
        "train-student", "--cache", str(bad), "--device", "cpu", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "refusing this bundle" in out and "Traceback" not in out
    assert not (tmp_path / "r").exists()


def test_zip_is_read_only(
    tmp_path: Path, cache_path: Path, teacher_dir: Path, npz_path: Path
) -> None:
    bundle = tmp_path / "c.zarr.zip"
    copying.pack_cache(cache_path, bundle, progress=False, log=lambda s: None)
    before = bundle.read_bytes()
    code, out = cli(
        "cache-logits",
        "--teacher",
        str(teacher_dir),
        "--dataset",
        f"npz:{npz_path}:train",
        "--out",
        str(bundle),
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 2 and "written once by `kd-pipeline cache pack`" in out
    LogitCache(bundle).read_logits(0)
    assert bundle.read_bytes() == before


# -------------------------------------------------------------------------------- two writers on s3
def test_s3_lease_admits_one_writer_and_names_it(s3_server: str) -> None:
    url = s3_url("lease/one.zarr")
    first = CacheLock(url).acquire()
    try:
        with pytest.raises(
            CacheError, match=f"another process is writing this cache \\(pid {os.getpid()} on "
        ):
            CacheLock(url).acquire()
    finally:
        first.release()
    assert not [k for k in key_sizes(open_store(url)) if k.startswith("kd-")]
    # Racing takers: exactly one wins a conditional PUT.
    results: list[str] = []
    barrier = threading.Barrier(4)

    def take() -> None:
        barrier.wait()
        try:
            lease = StoreLease(url).acquire()
            results.append("won")
            time.sleep(0.3)
            lease.release()
        except CacheError:
            results.append("refused")

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 3 + ["won"]


def test_expired_s3_lease_is_taken_over_and_the_old_holder_knows(s3_server: str) -> None:
    url = s3_url("lease/expired.zarr")
    old = StoreLease(url, seconds=0.4).acquire()
    old._stop.set()  # the holder freezes: no more renewals
    old._thread.join()
    time.sleep(0.5)
    new = StoreLease(url).acquire()  # taken over by compare-and-swap on the dead lease's ETag
    with pytest.raises(CacheError, match="another process"):
        StoreLease(url).acquire()
    with pytest.raises(
        OSError, match="pre-conditions"
    ):  # the old holder's renewal: a failed compare-and-swap
        old._put(IfMatch=old.etag)
    old.release()  # must not delete the new holder's lease
    content, _ = new.read()
    assert content["owner"] == new.owner
    new.release()


def test_second_cache_logits_on_s3_is_refused_while_the_first_runs(
    s3_server: str, teacher_dir: Path, tmp_path: Path
) -> None:
    """A real CLI writer to s3, frozen (SIGSTOP) mid-compute, holds the lease: a second writer is
    refused."""
    spec = f"npz:{write_npz(tmp_path / 'big.npz', n_train=20000, n_test=10)}:train"
    url = s3_url("two-writers/c.zarr")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "cache-logits",
            "--teacher",
            str(teacher_dir),
            "--dataset",
            spec,
            "--out",
            url,
            "--rows-per-shard",
            "500",
            "--batch-size",
            "50",
            "--device",
            "cpu",
            "--quiet",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in p.stdout:
            if "shards to compute" in line:
                break
        p.send_signal(signal.SIGSTOP)
        cfg = CacheConfig(
            teachers=[str(teacher_dir)],
            dataset=spec,
            out=url,
            device="cpu",
            batch_size=250,
            rows_per_shard=500,
        )
        with pytest.raises(
            CacheError, match=f"another process is writing this cache \\(pid {p.pid} "
        ):
            build_cache(cfg, log=lambda s: None, progress=False)
    finally:
        p.send_signal(signal.SIGCONT)
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 0, rest
    p.stdout.close()
    assert LogitCache(url).complete
    assert not [k for k in key_sizes(open_store(url)) if k.startswith("kd-")]


def test_sweep_streams_from_s3_with_the_same_rows_as_local(
    s3_cache: str, cache_path: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    rows = {}
    for name, cache in (("s3", s3_cache), ("dir", str(cache_path))):
        out = tmp_path / f"sweep-{name}"
        code, text = cli(
            "sweep",
            "--cache",
            cache,
            "-T",
            "2,8",
            "--alpha",
            "0.9",
            "--student",
            "mlp:16",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(out),
        )
        assert code == 0, text
        rows[name] = json.loads((out / "results.json").read_text())
    keys = ("setting", "status", "test_errors", "test_nll", "teacher_agreement")
    assert [{k: r[k] for k in keys} for r in rows["s3"]] == [
        {k: r[k] for k in keys} for r in rows["dir"]
    ]


def test_verify_accepts_a_shard_whose_labels_are_all_class_0(
    tmp_path: Path, teacher_dir: Path
) -> None:
    """zarr skips chunks equal to the fill value unless told not to: such a shard must not read as
    damage."""
    x, y = make_image_task(128, seed=5, classes=5)
    order = np.argsort(y, kind="stable")
    y = y[order]
    y[:64] = 0  # the first shard holds only class 0
    np.savez(tmp_path / "sorted.npz", x_train=x[order], y_train=y, num_classes=np.int64(5))
    out = tmp_path / "sorted.zarr"
    teacher_cache(teacher_dir, f"npz:{tmp_path / 'sorted.npz'}:train", out, rows_per_shard=64)
    assert (out / "labels" / "c" / "0").is_file()  # every chunk is stored now
    assert verify.verify_cache(out).ok
    # A cache from before that change has no object for it. Only the dataset can tell it from a
    # deleted chunk: with --dataset it is sound (the fill value is the data), else a problem.
    (out / "labels" / "c" / "0").unlink()
    spec = f"npz:{tmp_path / 'sorted.npz'}:train"
    report = verify.verify_cache(out, dataset=spec)
    assert report.ok, report.problems
    assert any(
        "labels/c/0 is absent, and the dataset's labels there are all class 0" in n
        for n in report.notes
    )
    report = verify.verify_cache(out)
    assert report.problems == [
        "chunk labels/c/0 is missing (a cache made before every chunk was "
        "stored omits an all-class-0 labels chunk: --dataset SPEC checks "
        "that against the data)"
    ]
    # The reader serves it only against the dataset's labels, which prove the fill value right.
    with pytest.raises(CacheError, match="chunk labels/c/0 .* is missing"):
        LogitCache(out).read_labels(0)
    assert np.array_equal(LogitCache(out).read_labels(0, truth=y), np.zeros(64, dtype=np.int64))
    code, text = cli(
        "train-student",
        "--cache",
        str(out),
        "--student",
        "mlp:16",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    )
    assert code == 0, text


def test_copy_into_a_folder_of_other_caches_is_refused(cache_path: Path, tmp_path: Path) -> None:
    """`cache copy A caches/` (as with cp) must not spill A's objects into the folder holding other
    caches."""
    folder = tmp_path / "caches"
    copying.copy_cache(cache_path, folder / "a.zarr", progress=False, log=lambda s: None)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(
        CacheError,
        match="already holds other objects .* and is not a cache; copy into a new location",
    ):
        copying.copy_cache(cache_path, folder, progress=False, log=lambda s: None)
    assert (
        sorted(p.relative_to(folder) for p in folder.rglob("*") if p.name != "kd-writer.lock")
        == before
    )
    assert [s.location for s in listing.list_caches(folder)] == [str(folder / "a.zarr")]


def test_a_failed_renewal_keeps_a_lease_that_is_still_ours(s3_server: str) -> None:
    url = s3_url("lease/flaky.zarr")
    lease = StoreLease(url, seconds=2.0).acquire()  # renewed every 0.5 s
    real_put, failures = lease._put, []

    def flaky_put(**cond: str) -> str:
        if not failures:
            failures.append(cond)
            raise OSError("SlowDown: please reduce your request rate")  # one throttled request
        return real_put(**cond)

    lease._put = flaky_put
    time.sleep(1.3)  # one failed renewal, then a good one
    assert failures and lease.lost is None
    lease.check()
    # Someone else holding it is a lost lease, reported by check() (which cache-logits calls before
    # every shard).
    lease._stop.set()
    lease._thread.join()
    other = StoreLease(url, seconds=60)
    other.etag = other._put(IfMatch=lease.etag)  # as a takeover after expiry would
    lease._stop.clear()
    lease._thread = threading.Thread(target=lease._renew_loop, daemon=True)
    lease._thread.start()
    time.sleep(0.8)
    with pytest.raises(CacheError, match="lost its lease .*taken over by lease"):
        lease.check()
    lease.release()  # must not delete the other holder's lease
    assert other.read()[0]["owner"] == other.owner
    other.release()


# ----------------------------------------------------------------------- verify: every damage named
VERIFY_DAMAGES = {
    # (damage, what the report must say); verify is given the dataset, so rewritten labels show too
    "deleted labels chunk": (remove("labels/c/2"), "chunk labels/c/2 is missing"),
    "label 99": (
        write("labels", 3, 99),
        "array labels holds 1 values outside 0..4 (rows [3] hold [99])",
    ),
    "label -1": (
        write("labels", 64, -1),
        "array labels holds 1 values outside 0..4 (rows [64] hold [-1])",
    ),
    "labels rewritten": (
        relabel,
        "array labels differs from the dataset's in 1 rows (sample ids [130]: cache",
    ),
    "deleted logits chunk": (
        remove("members/0/logits/c/4/0"),
        "chunk members/0/logits/c/4/0 is missing",
    ),
    "-inf logit": (
        write("members/0/logits", (200, 1), -np.inf),
        "member 0 (dense): logits holds NaN/inf in rows [200]",
    ),
    "zeroed done flag": (
        write("members/0/done", 7, 0),
        "the header says complete, but 1/20 member-shards are not marked done: member 0 shards [7]",
    ),
    "header class count": (
        edit_header(num_classes=6, class_names=[str(i) for i in range(6)]),
        "array members/0/logits has shape (600, 5), dtype float16, chunks "
        "(64, 5); the header says shape (600, 6)",
    ),
}


@pytest.mark.parametrize("kind", ["dir", "zip"])
@pytest.mark.parametrize("case", list(VERIFY_DAMAGES))
def test_verify_names_each_damage(
    cache_path: Path, npz_path: Path, tmp_path: Path, case: str, kind: str
) -> None:
    damage, says = VERIFY_DAMAGES[case]
    cache = damaged(cache_path, tmp_path, kind, damage)
    code, out = cli("cache", "verify", str(cache), "--dataset", f"npz:{npz_path}:train", "--quiet")
    assert code == 1, out
    assert says in out, out  # (a consequence may follow: 0s read for a missing chunk differ, ...)


def test_damaged_s3_cache_is_refused_by_train_student_and_named_by_verify(
    s3_cache: str, tmp_path: Path
) -> None:
    url = s3_url("damaged/task.zarr")
    copying.copy_cache(s3_cache, url, progress=False, log=lambda s: None)
    s3 = boto3.client("s3")
    args = (
        "train-student",
        "--cache",
        url,
        "--student",
        "mlp:16",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    s3.delete_object(Bucket=S3_BUCKET, Key="damaged/task.zarr/members/0/logits/c/4/0")
    code, out = cli(*args, "--out", str(tmp_path / "a"))
    assert code == 2, out
    assert (
        "chunk members/0/logits/c/4/0 (member 0's logits, shard 4: rows 256..319) is missing" in out
    )
    s3.delete_object(Bucket=S3_BUCKET, Key="damaged/task.zarr/members/1/done/c/3")
    code, out = cli(*args, "--out", str(tmp_path / "b"))
    assert code == 2 and "done flags are missing or zero (member 1 shards [3])" in out, out
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    code, out = cli("cache", "verify", url, "--quiet")
    assert code == 1 and "2 PROBLEM(S)" in out and "chunk members/0/logits/c/4/0 is missing" in out
    assert "member-shards are not marked done: member 1 shards [3]" in out


def test_verify_of_a_cache_being_filled_reports_pending_not_missing(
    partial_cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer finishing a shard between verify's listing and its reading of the done flags used
    to make that shard's chunks 'missing'; shards still not done are pending, never missing."""
    import shutil

    cache = tmp_path / "filling.zarr"
    shutil.copytree(partial_cache_path, cache)  # member 0's shard 3 not done
    group = zarr.open_group(str(cache), mode="r+", use_consolidated=False)
    group["members/1/done"][5] = 0  # and member 1's shard 5, not written yet at all
    (cache / "members/1/logits/c/5/0").unlink()
    chunk = cache / "members/0/logits/c/3/0"
    written = chunk.read_bytes()
    chunk.unlink()
    (cache / CacheLock.NAME).write_text(json.dumps({"pid": os.getpid(), "host": "writer-host"}))
    listed = verify._check_keys

    def listed_then_the_writer_finishes_shard_3(sizes: dict, rep: reports.VerifyReport) -> None:
        listed(sizes, rep)
        chunk.write_bytes(written)  # the writer's order: the shard's data, then its done flag
        group["members/0/done"][3] = 1

    monkeypatch.setattr(verify, "_check_keys", listed_then_the_writer_finishes_shard_3)
    code, out = cli("cache", "verify", str(cache), "--quiet")
    assert code == 0, out
    assert "missing" not in out and "result     OK" in out
    assert (
        "partial cache: 19/20 member-shards done (the other 1 are pending: a writer holds the "
        "lock and is filling them)"
    ) in out


def test_cache_ls_lists_a_damaged_cache_as_unreadable_and_goes_on(
    cache_path: Path, tmp_path: Path
) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    damaged(cache_path, shelf, "dir", remove("members/1/done/c/3"))  # shelf/damaged.zarr
    copying.copy_cache(cache_path, shelf / "sound.zarr", progress=False, log=lambda s: None)
    code, out = cli("cache", "ls", str(shelf))
    assert code == 0, out
    assert f"{shelf / 'damaged.zarr'}  UNREADABLE: " in out and "done flags are missing" in out
    assert f"{shelf / 'sound.zarr'}  complete" in out
