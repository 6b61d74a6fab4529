"""One writer at a time (``CacheLock``) and writers killed mid-way: live and dead locks, another
host's lock, a killed writer's leftovers, and creations or added members interrupted (SIGKILL) at
each step, redone or finished by the next run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.header import ATTR_KEY
from pipeline.cache.lock import CacheLock
from pipeline.cache.lookup import read_header
from pipeline.cache.read import LogitCache
from pipeline.checkpoints import load_checkpoint
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError
from tests.helpers.writer import (
    RPS,
    make,
    model_outputs,
    set_complete_flag,
    snapshot,
    stored_logits,
)

# pytest resets the warning filters pipeline.cache installs; these two are expected and harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


# ------------------------------------------------------------------------------------ 10. CacheLock
def write_lock(root: Path, pid: int, host: str | None = None) -> Path:
    path = root / CacheLock.NAME
    path.write_text(
        json.dumps(
            {"pid": pid, "host": host or socket.gethostname(), "since": "2026-01-01T00:00:00"}
        )
    )
    return path


def test_live_lock_is_refused_dead_lock_is_taken_over(
    cache_copy: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    (cache_copy / "members/0/done/c/2").unlink()
    set_complete_flag(cache_copy, False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = write_lock(cache_copy, sleeper.pid)
        with pytest.raises(CacheError) as e:
            make(cache_copy, [teacher_dir], dataset_spec)
        assert f"pid {sleeper.pid} on {socket.gethostname()}" in str(e.value)
        assert "another process is writing" in str(e.value)
        assert lock.exists() and json.loads(lock.read_text())["pid"] == sleeper.pid
        assert not LogitCache(cache_copy, allow_partial=True).complete
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its writer is dead now: the lock is stale and is taken over.
    res = make(cache_copy, [teacher_dir], dataset_spec)
    assert res.status == "resumed" and res.shards_computed == 1
    assert LogitCache(cache_copy).complete
    assert not lock.exists()


def test_a_killed_writers_lock_temp_file_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    """A SIGKILL between writing the lock's temp file and unlinking it leaves the temp file; the
    next writer removes it (a live writer's is kept)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{CacheLock.NAME}.{dead.pid}.tmp"
    stale.write_text("{}")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"{CacheLock.NAME}.{sleeper.pid}.tmp"
        live.write_text("{}")
        lock = CacheLock(tmp_path).acquire()
        assert not stale.exists() and live.exists()
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_another_host_is_not_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, dead.pid, host="elsewhere.example")
    with pytest.raises(CacheError, match="elsewhere.example"):
        CacheLock(tmp_path).acquire()
    write_lock(tmp_path, dead.pid)
    lock = CacheLock(tmp_path).acquire()
    assert json.loads((tmp_path / CacheLock.NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(CacheError, match=f"pid {os.getpid()}"):
        CacheLock(tmp_path).acquire()  # this very process holds it
    lock.release()
    assert not (tmp_path / CacheLock.NAME).exists()


# ------------------------------------------------------------------- interrupted creation (SIGKILL)
def test_creation_killed_before_the_store_existed_is_redone(
    tmp_path: Path, complete_cache: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    """Killed right after making the directory and taking the lock: only a stale lock is there."""
    out = tmp_path / "c.zarr"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(out, dead.pid)
    assert read_header(out) is None
    res = make(out, [teacher_dir], dataset_spec)
    assert res.status == "created" and res.shards_computed == 10
    for k in (0, 1):
        assert np.array_equal(stored_logits(out, k), stored_logits(complete_cache, k))
    assert sorted(p.name for p in out.iterdir()) == [
        "ids",
        "labels",
        "members",
        "row_count",
        "row_start",
        "zarr.json",
    ]


def test_creation_killed_midway_is_redone(
    cache_copy: Path, complete_cache: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    """Killed while the schema was being written: the creation marker is there, the header is not
    whole."""
    from pipeline.cache.layout import CREATING_MARKER

    shutil.rmtree(cache_copy / "members/1")
    g = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)
    g.attrs[ATTR_KEY] = {
        **g.attrs[ATTR_KEY],
        "members": g.attrs[ATTR_KEY]["members"][:1],
        "complete": False,
    }
    (cache_copy / CREATING_MARKER).touch()
    (cache_copy / "ids/c/0.0a1b2c3d.partial").write_bytes(b"x")
    assert read_header(cache_copy) is None
    res = make(cache_copy, [teacher_dir], dataset_spec)
    assert res.status == "created" and res.shards_computed == 10
    cache = LogitCache(cache_copy)
    assert cache.complete and len(cache.members) == 2
    for k in (0, 1):
        assert np.array_equal(stored_logits(cache_copy, k), stored_logits(complete_cache, k))
    assert not (cache_copy / CREATING_MARKER).exists() and not list(cache_copy.rglob("*.partial"))


def test_add_member_killed_before_the_header_named_it_is_redone(
    cache_copy: Path, new_teacher: Path, dataset_spec: str
) -> None:
    """Killed after creating member 2's arrays (and writing a shard) but before the header listed
    it."""
    g = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)
    g.create_array(
        "members/2/logits", shape=(600, 5), dtype="float16", chunks=(RPS, 5), fill_value=0
    )
    g.create_array("members/2/done", shape=(10,), dtype="uint8", chunks=(1,), fill_value=0)
    g["members/2/logits"][:RPS] = np.full((RPS, 5), 7, dtype=np.float16)
    g["members/2/done"][0] = 1
    assert len(LogitCache(cache_copy).members) == 2
    res = make(cache_copy, [new_teacher], dataset_spec, add_member=True, rows_per_shard=None)
    assert res.status == "member-added" and res.shards_computed == 10
    cache = LogitCache(cache_copy)
    assert cache.complete and len(cache.members) == 3
    ref = model_outputs(new_teacher, load_dataset(dataset_spec).x).astype(np.float16)
    assert np.array_equal(stored_logits(cache_copy, 2), ref)


def test_add_member_killed_after_the_header_named_it_is_finished(
    cache_copy: Path, complete_cache: Path, teacher_dir: Path, new_teacher: Path, dataset_spec: str
) -> None:
    """Killed after the header listed member 2 (cache partial): the message says how to finish it,
    and that works."""
    from pipeline.cache.create import add_member_arrays

    g = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)
    add_member_arrays(g, load_checkpoint(new_teacher).identity())
    old = snapshot(cache_copy, "members/0") | snapshot(cache_copy, "members/1")
    with pytest.raises(CacheError) as e:
        make(cache_copy, [new_teacher], dataset_spec, add_member=True, rows_per_shard=None)
    msg = str(e.value)
    assert "partial" in msg and "without --add-member" in msg
    assert msg.index("member-0.pt") < msg.index("member-1.pt") < msg.index(str(new_teacher))
    res = make(cache_copy, [teacher_dir, new_teacher], dataset_spec)
    assert res.status == "resumed" and res.shards_computed == 10
    assert LogitCache(cache_copy).complete
    assert snapshot(cache_copy, "members/0") | snapshot(cache_copy, "members/1") == old
    for k in (0, 1):
        assert np.array_equal(stored_logits(cache_copy, k), stored_logits(complete_cache, k))
