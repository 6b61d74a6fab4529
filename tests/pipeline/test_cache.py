"""The Zarr logit cache and its writer (``pipeline.cache``, ``pipeline.cache_writer``) on real
stores on disk.

Every cache here is made by ``build_cache`` from a real teacher ensemble over a real dataset file,
and every value is checked against the teacher's own outputs or against another real run, never
against itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import __version__
from pipeline.cache.format import (
    ATTR_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    CacheLock,
    LogitCache,
    MissingChunkError,
    read_header,
)
from pipeline.cache.writer import build_cache
from pipeline.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from pipeline.config import CacheConfig, TeacherConfig
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError, CheckpointError
from pipeline.training.loop import TrainConfig
from pipeline.training.teacher import train_teacher
from tests.helpers.data import write_npz

REPO = Path(__file__).resolve().parents[2]
RPS = 64  # rows per shard: 600 rows -> 10 shards (the last one short)
BATCH = 64

# pytest resets the warning filters pipeline.cache installs; these two are expected and harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


# ------------------------------------------------------------------------------------------ helpers
def spec_of(npz: Path, *mods: str) -> str:
    return ":".join([f"npz:{npz}:train", *mods])


def members_of(teacher_dir: Path) -> list[Path]:
    return [teacher_dir / "member-0.pt", teacher_dir / "member-1.pt"]


def make(out: Path, teachers: list, dataset: str, **kw: object):  # noqa: ANN201
    """build_cache with quiet logging, the test's shard size and batch size unless overridden."""
    kw.setdefault("rows_per_shard", RPS)
    kw.setdefault("batch_size", BATCH)
    cfg = CacheConfig(
        teachers=[str(t) for t in teachers],
        dataset=dataset,
        out=str(out),
        device="cpu",
        command="pytest make",
        **kw,
    )
    return build_cache(cfg, log=lambda s: None, progress=False)


def snapshot(root: Path, under: str = "") -> dict[str, tuple[str, int]]:
    """{relative path: (sha256 of bytes, mtime_ns)} of every file under ``root/under``."""
    base = root / under if under else root
    return {
        str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
        for f in sorted(base.rglob("*"))
        if f.is_file()
    }


def raw_group(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r", use_consolidated=False)


def stored_logits(path: Path, member: int) -> np.ndarray:
    return raw_group(path)[f"members/{member}/logits"][:]


@torch.inference_mode()
def model_outputs(checkpoint: Path, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """The teacher's own float32 logits: load_checkpoint + model(x), in batches of ``batch``
    rows."""
    model = load_checkpoint(checkpoint).model
    return (
        torch.cat(
            [
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
                for i in range(0, len(x), batch)
            ]
        )
        .float()
        .numpy()
    )


def train(out: Path, npz: Path, model: str, seed: int, members: int = 1, epochs: int = 2) -> Path:
    train_teacher(
        TeacherConfig(
            dataset=spec_of(npz),
            model=model,
            input_dropout=0.0,
            dropout=0.0,
            jitter=0,
            members=members,
            eval=None,
            out=str(out),
            device="cpu",
            train=TrainConfig(epochs=epochs, batch_size=64, seed=seed),
        ),
        log=lambda s: None,
    )
    return out


def set_complete_flag(path: Path, value: bool) -> None:
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    h = dict(g.attrs[ATTR_KEY])
    h["complete"] = value
    g.attrs[ATTR_KEY] = h


def ids_in(message: str) -> list[int]:
    """The sample ids an error message lists: '... sample ids [3, 7, ...] (12 in all)'."""
    m = re.search(r"sample ids \[([0-9, .]*)\] \((\d+) in all\)", message)
    assert m, message
    return [int(v) for v in m.group(1).replace("...", "").split(",") if v.strip()]


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset_spec(npz_path: Path) -> str:
    return spec_of(npz_path)


@pytest.fixture(scope="module")
def complete_cache(
    tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, dataset_spec: str
) -> Path:
    """A complete float16 cache of the 2-member teacher over the 600-row set, 10 shards. Tests copy
    it."""
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    res = make(out, [teacher_dir], dataset_spec)
    assert res.status == "created"
    return out


@pytest.fixture
def cache_copy(complete_cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(complete_cache, dst)
    return dst


@pytest.fixture(scope="module")
def new_teacher(tmp_path_factory: pytest.TempPathFactory, npz_path: Path) -> Path:
    """A separately trained mlp:16 teacher (seed 7) on the same data: a candidate new member."""
    return train(tmp_path_factory.mktemp("new-teacher"), npz_path, "mlp:16", seed=7) / "member-0.pt"


# -------------------------------------------------------------------------------- 1. format, values
def g_rows_ok(path: Path) -> bool:
    """Format 2's sample -> rows index: one row per sample, in order."""
    g = raw_group(path)
    return g["row_start"][:].tolist() == list(range(600)) and set(g["row_count"][:]) == {1}


def test_header_has_every_promised_field(
    complete_cache: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    h = raw_group(complete_cache).attrs[ATTR_KEY]
    data = load_dataset(dataset_spec)
    assert h["format"] == FORMAT_NAME == "kd-pipeline-logit-cache"
    assert h["version"] == FORMAT_VERSION == 2
    assert h["rows"] == {"n": 600, "per_shard": RPS, "views": 1, "positions": 1}
    assert h["seed"] == 0
    assert h["n"] == 600 and h["num_classes"] == 5
    assert h["class_names"] == data.class_names == ["0", "1", "2", "3", "4"]
    assert h["rows_per_shard"] == RPS and h["n_shards"] == 10
    assert h["dtype"] == "float16"
    assert h["codecs"] == ["bytes(little-endian)", "zstd(level=3)", "crc32c"]
    assert h["labeled"] is True
    assert h["dataset"]["fingerprint"] == data.fingerprint
    assert h["dataset"]["spec"] == data.spec and h["dataset"]["n"] == 600
    assert h["dataset"]["sample_shape"] == [1, 8, 8]
    assert [m["index"] for m in h["members"]] == [0, 1]
    for m, path in zip(h["members"], members_of(teacher_dir), strict=True):
        assert m["checkpoint_sha256"] == file_sha256(path)
        assert m["array"] == f"members/{m['index']}/logits"
        assert Path(m["path"]).resolve() == path.resolve()
        assert m["model_spec"].startswith("mlp:32") and m["num_classes"] == 5
        assert m["storage"]["kind"] == "dense" and m["storage"]["size"] is None
        # float16 rounding is all a dense member loses: recorded per temperature at write time
        fid = m["storage"]["fidelity"]
        assert fid["rows"] == 600 and fid["temperatures"] == [1.0, 2.0, 4.0, 8.0, 20.0]
        assert all(0 <= kl < 1e-4 for kl in fid["kl_max"]) and fid["kept_mass_min"] == [1.0] * 5
    assert g_rows_ok(complete_cache)
    assert h["tool"] == "kd-pipeline" and h["tool_version"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", h["created"])
    assert h["command"] == "pytest make"
    assert h["complete"] is True and h["completed_at"]
    # Storage matches the header: one chunk per shard, the promised codecs.
    g = raw_group(complete_cache)
    arr = g["members/0/logits"]
    assert arr.dtype == np.float16 and arr.shape == (600, 5) and arr.chunks == (RPS, 5)
    assert [type(c).__name__ for c in arr.compressors] == ["ZstdCodec", "Crc32cCodec"]
    assert g["members/1/done"].shape == (10,) and g["members/1/done"][:].tolist() == [1] * 10
    # Every logits chunk is its own object on disk.
    assert sorted(int(p.name) for p in (complete_cache / "members/0/logits/c").iterdir()) == list(
        range(10)
    )


def test_logits_are_the_teachers_outputs(
    complete_cache: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    data = load_dataset(dataset_spec)
    cache = LogitCache(complete_cache)
    assert np.array_equal(cache.read_ids(), np.arange(600))
    assert np.array_equal(cache.read_ids(), data.ids)
    assert np.array_equal(cache.read_labels(), data.y)
    assert np.array_equal(cache.read_labels(3), data.y[192:256])
    for k, path in enumerate(members_of(teacher_dir)):
        ref = model_outputs(path, data.x)
        got = stored_logits(complete_cache, k)
        assert got.dtype == np.float16
        # Same batches as the writer: float16 rounding of the very same float32 values.
        assert np.array_equal(got, ref.astype(np.float16))
        # And, independent of batching, within float16 rounding of one full forward pass.
        whole = model_outputs(path, data.x, batch=600)
        np.testing.assert_allclose(got.astype(np.float32), whole, rtol=2.0**-10, atol=1e-4)
        assert np.abs(ref).max() > 1  # real logits, not zeros (fill value)
    # read_logits: (M, rows, C), members in the asked order; the short last shard has 600 - 9 * 64
    # rows.
    last = cache.read_logits(9)
    assert last.shape == (2, 600 - 9 * RPS, 5)
    swapped = cache.read_logits(2, members=[1, 0])
    assert np.array_equal(swapped[0], stored_logits(complete_cache, 1)[128:192])
    assert np.array_equal(swapped[1], stored_logits(complete_cache, 0)[128:192])
    shards = list(cache.iter_shards())
    assert [s for s, _ in shards] == list(range(10))
    assert np.array_equal(
        np.concatenate([lg for _, lg in shards], axis=1)[0], stored_logits(complete_cache, 0)
    )


def test_float32_option_stores_exact_logits(
    tmp_path: Path, teacher_dir: Path, npz_path: Path
) -> None:
    spec = spec_of(npz_path, "fraction=0.5", "seed=3")
    data = load_dataset(spec)
    out = tmp_path / "f32.zarr"
    res = make(out, [teacher_dir], spec, dtype="float32", rows_per_shard=50, batch_size=50)
    assert res.status == "created" and res.shards_computed == 6 and res.rows_computed == 300
    cache = LogitCache(out)
    assert cache.header.dtype == "float32" and cache.n == 300
    # Stable ids: each row keeps its index in the unmodified split.
    assert np.array_equal(cache.read_ids(), data.ids) and not np.array_equal(
        data.ids, np.arange(300)
    )
    assert np.array_equal(cache.read_labels(), data.y)
    for k, path in enumerate(members_of(teacher_dir)):
        got = stored_logits(out, k)
        assert got.dtype == np.float32
        assert np.array_equal(got, model_outputs(path, data.x, batch=50))


# ------------------------------------------------------------------- 2. no-op, refusals, add-member
def test_rerun_on_complete_cache_is_a_noop(
    cache_copy: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    before = snapshot(cache_copy)
    res = make(cache_copy, [teacher_dir], dataset_spec)
    assert (
        res.status == "already-complete"
        and res.shards_computed == 0
        and "nothing to do" in res.message
    )
    # Defaults (no --rows-per-shard / --dtype) also match the existing cache.
    res = make(cache_copy, [teacher_dir], dataset_spec, rows_per_shard=None)
    assert res.status == "already-complete"
    assert snapshot(cache_copy) == before
    assert not (cache_copy / CacheLock.NAME).exists()


@pytest.mark.parametrize(
    ("teachers", "mods", "kw", "expected"),
    [
        ("member-0", (), {}, ["teachers:", "member-1.pt"]),
        ("dir", ("fraction=0.5",), {}, ["dataset:", "fingerprint", "fraction=0.5"]),
        (
            "dir",
            (),
            {"dtype": "float32"},
            ["dtype: the cache stores float16, you asked for float32"],
        ),
        (
            "dir",
            (),
            {"rows_per_shard": 100},
            ["rows per shard: the cache uses 64, you asked for 100"],
        ),
    ],
)
def test_a_different_cache_is_refused(
    cache_copy: Path,
    teacher_dir: Path,
    npz_path: Path,
    teachers: str,
    mods: tuple,
    kw: dict,
    expected: list[str],
) -> None:
    before = snapshot(cache_copy)
    given = [teacher_dir / "member-0.pt"] if teachers == "member-0" else [teacher_dir]
    with pytest.raises(CacheError) as e:
        make(cache_copy, given, spec_of(npz_path, *mods), **kw)
    msg = str(e.value)
    assert "already holds a different cache" in msg
    for part in expected:
        assert part in msg
    assert snapshot(cache_copy) == before


def test_add_member_appends_without_rewriting(
    cache_copy: Path, teacher_dir: Path, new_teacher: Path, dataset_spec: str, npz_path: Path
) -> None:
    old = snapshot(cache_copy, "members/0") | snapshot(cache_copy, "members/1")
    old_values = [stored_logits(cache_copy, k) for k in (0, 1)]
    res = make(cache_copy, [new_teacher], dataset_spec, add_member=True, rows_per_shard=None)
    assert res.status == "member-added" and res.shards_computed == 10 and res.rows_computed == 600
    assert res.members == 3
    # Members 0 and 1: not one of their files rewritten.
    assert snapshot(cache_copy, "members/0") | snapshot(cache_copy, "members/1") == old
    cache = LogitCache(cache_copy)
    assert cache.complete
    m = cache.members[2]
    assert m.index == 2 and m.checkpoint_sha256 == file_sha256(new_teacher)
    assert m.model_spec.startswith("mlp:16")
    data = load_dataset(dataset_spec)
    assert np.array_equal(
        stored_logits(cache_copy, 2), model_outputs(new_teacher, data.x).astype(np.float16)
    )
    for k in (0, 1):
        assert np.array_equal(stored_logits(cache_copy, k), old_values[k])
    assert cache.read_logits(4).shape == (3, RPS, 5)
    assert cache.done_shards().tolist() == list(range(10))
    # Adding it again: nothing to do. A resume with all three teachers in order: complete already.
    again = make(cache_copy, [new_teacher], dataset_spec, add_member=True, rows_per_shard=None)
    assert again.status == "already-complete"
    full = make(cache_copy, [teacher_dir, new_teacher], dataset_spec)
    assert full.status == "already-complete"
    # The command that made the cache, re-run after --add-member: a no-op too (it was refused as
    # "already holds a different cache").
    original = make(cache_copy, [teacher_dir], dataset_spec)
    assert original.status == "already-complete" and original.shards_computed == 0
    assert original.message.endswith(
        "(600 rows, 3 members: the given 2 and 1 added with --add-member); nothing to do"
    )
    # Only a prefix of the members the cache was made with is still another cache.
    with pytest.raises(CacheError, match="already holds a different cache"):
        make(cache_copy, [teacher_dir / "member-0.pt"], dataset_spec)
    # A teacher on a dataset with another fingerprint is refused, and nothing changes.
    before = snapshot(cache_copy)
    other = train(cache_copy.parent / "t2", npz_path, "mlp:8", seed=11) / "member-0.pt"
    with pytest.raises(CacheError, match="fingerprint") as e:
        make(
            cache_copy,
            [other],
            spec_of(npz_path, "fraction=0.5"),
            add_member=True,
            rows_per_shard=None,
        )
    assert "--add-member" in str(e.value)
    assert snapshot(cache_copy) == before


def test_add_member_needs_an_existing_complete_cache(
    tmp_path: Path, cache_copy: Path, new_teacher: Path, dataset_spec: str
) -> None:
    with pytest.raises(CacheError, match="needs an existing complete cache"):
        make(tmp_path / "none.zarr", [new_teacher], dataset_spec, add_member=True)
    set_complete_flag(cache_copy, False)
    (cache_copy / "members/1/done/c/4").unlink()
    with pytest.raises(CacheError, match="partial; finish it first"):
        make(cache_copy, [new_teacher], dataset_spec, add_member=True)


# --------------------------------------------------------------------------------------- 3. partial
def test_partial_cache_is_refused_then_served_then_resumed(
    cache_copy: Path, complete_cache: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    for rel in ("members/1/done/c/3", "members/1/done/c/7", "members/0/done/c/7"):
        (cache_copy / rel).unlink()
    set_complete_flag(cache_copy, False)
    with pytest.raises(CacheError) as e:
        LogitCache(cache_copy)
    assert "--allow-partial" in str(e.value) and "17/20 member-shards" in str(e.value)
    cache = LogitCache(cache_copy, allow_partial=True)
    assert not cache.complete
    assert cache.count_done() == (17, 20)
    assert cache.done_shards().tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    assert cache.done_shards([0]).tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    served = dict(cache.iter_shards())
    assert sorted(served) == [0, 1, 2, 4, 5, 6, 8, 9]
    full = LogitCache(complete_cache)
    for s, logits in served.items():
        assert np.array_equal(logits, full.read_logits(s))
    # Resuming computes exactly the missing member-shards, and the result is the uninterrupted
    # cache.
    res = make(cache_copy, [teacher_dir], dataset_spec)
    assert res.status == "resumed" and res.shards_computed == 2 and res.rows_computed == 2 * RPS
    assert LogitCache(cache_copy).complete
    for k in (0, 1):
        assert np.array_equal(stored_logits(cache_copy, k), stored_logits(complete_cache, k))


def test_resume_removes_interrupted_write_leftovers(
    cache_copy: Path, complete_cache: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    (cache_copy / "members/0/done/c/5").unlink()
    set_complete_flag(cache_copy, False)
    # What zarr's LocalStore leaves when killed mid-write: a temp file next to the chunk.
    leftover = cache_copy / "members/0/logits/c/5/0.0123abcd.partial"
    leftover.write_bytes(b"half a chunk")
    logs: list[str] = []
    res = build_cache(
        CacheConfig(
            teachers=[str(teacher_dir)],
            dataset=dataset_spec,
            out=str(cache_copy),
            device="cpu",
            batch_size=BATCH,
        ),
        log=logs.append,
        progress=False,
    )
    assert res.status == "resumed" and res.shards_computed == 1
    assert not leftover.exists() and not list(cache_copy.rglob("*.partial"))
    assert any("removed 1 temporary files" in s for s in logs)
    assert np.array_equal(stored_logits(cache_copy, 0), stored_logits(complete_cache, 0))


# ------------------------------------------------------------------------------------ 5. corruption
def test_corrupt_chunk_is_named(cache_copy: Path) -> None:
    chunk = cache_copy / "members/0/logits/c/3/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    cache = LogitCache(cache_copy)  # opening reads no chunk data
    with pytest.raises(CacheError) as e:
        cache.read_logits(3)
    msg = str(e.value)
    assert "'members/0/logits'" in msg and "chunk (3, 0)" in msg and "corrupted" in msg
    # Other chunks, and the other member's same shard, still read.
    assert cache.read_logits(2).shape == (2, RPS, 5)
    assert cache.read_logits(3, members=[1]).shape == (1, RPS, 5)


def test_truncated_chunk_is_named(cache_copy: Path) -> None:
    chunk = cache_copy / "members/1/logits/c/9/0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(CacheError, match=r"chunk \(9, 0\) of array 'members/1/logits'"):
        LogitCache(cache_copy).read_logits(9)


# ------------------------------------------------------------------------- 6. errors damage nothing
def test_members_with_different_class_counts_write_nothing(
    tmp_path: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    three = write_npz(tmp_path / "three.npz", n_train=200, n_test=10, classes=3)
    other = train(tmp_path / "three-teacher", three, "mlp:8", seed=1, epochs=1) / "member-0.pt"
    out = tmp_path / "out.zarr"
    with pytest.raises(CheckpointError) as e:
        make(out, [teacher_dir / "member-0.pt", other], dataset_spec)
    assert "disagree on the number of classes" in str(e.value) and "3" in str(e.value)
    assert not out.exists()


def test_unloadable_member_leaves_existing_cache_untouched(
    cache_copy: Path, tmp_path: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    bad = tmp_path / "member-2.pt"
    bad.write_bytes(os.urandom(4096))
    before = snapshot(cache_copy)
    with pytest.raises(CheckpointError, match="member-2.pt: cannot load"):
        make(cache_copy, [teacher_dir, bad], dataset_spec)
    with pytest.raises(CheckpointError):
        make(cache_copy, [bad], dataset_spec, add_member=True)
    assert snapshot(cache_copy) == before
    assert LogitCache(cache_copy).complete


def test_changed_dataset_file_is_refused(tmp_path: Path, teacher_dir: Path, npz_path: Path) -> None:
    npz = tmp_path / "data.npz"
    shutil.copy(npz_path, npz)
    out = tmp_path / "c.zarr"
    make(out, [teacher_dir], spec_of(npz))
    before = snapshot(out)
    with np.load(npz) as z:
        arrays = dict(z)
    arrays["x_train"][123, 0, 4, 4] += 0.5
    np.savez(npz, **arrays)
    with pytest.raises(CacheError) as e:
        make(out, [teacher_dir], spec_of(npz))
    assert "fingerprint" in str(e.value) and "dataset:" in str(e.value)
    assert snapshot(out) == before
    cache = LogitCache(out)
    assert cache.complete and cache.read_logits(1).shape == (2, RPS, 5)


@pytest.fixture(scope="module")
def scaled_teacher(
    tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, npz_path: Path
) -> tuple:
    """member-0 with its last layer scaled so that about 30% of the rows have a logit beyond
    float16's range."""
    lm = load_checkpoint(teacher_dir / "member-0.pt")
    x = load_dataset(spec_of(npz_path)).x
    row_max = np.abs(model_outputs(teacher_dir / "member-0.pt", x)).max(axis=1)
    scale = 65504.0 / float(np.quantile(row_max, 0.7))
    last = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight *= scale
        last.bias *= scale
    path = save_checkpoint(tmp_path_factory.mktemp("scaled") / "member-0.pt", lm.model, lm.meta)
    return path, model_outputs(path, x)


def test_logits_beyond_float16_are_refused_with_ids(
    tmp_path: Path, scaled_teacher: tuple, dataset_spec: str
) -> None:
    path, ref = scaled_teacher
    over = (np.abs(ref) > 65504).any(axis=1)
    assert 0.1 < over.mean() < 0.5  # the fixture did what it says
    with pytest.raises(CacheError) as e:
        make(tmp_path / "f16.zarr", [path], dataset_spec)
    msg = str(e.value)
    assert "--dtype float32" in msg and "float16" in msg
    # The ids named are the overflowing rows of the first shard that has any.
    first = int(np.flatnonzero(over)[0]) // RPS
    expected = np.flatnonzero(over[first * RPS : (first + 1) * RPS]) + first * RPS
    assert ids_in(msg) == expected[:20].tolist()
    assert f"({expected.size} in all)" in msg
    # Nothing non-finite was stored: the failing shard is not done, the cache is partial.
    cache = LogitCache(tmp_path / "f16.zarr", allow_partial=True)
    assert not cache.complete and first not in cache.done_shards().tolist()
    for s in cache.done_shards():
        assert np.isfinite(cache.read_logits(int(s)).astype(np.float32)).all()
    # float32 storage keeps them.
    res = make(tmp_path / "f32.zarr", [path], dataset_spec, dtype="float32")
    assert res.status == "created"
    got = stored_logits(tmp_path / "f32.zarr", 0)
    assert np.array_equal(got, ref) and np.abs(got).max() > 65504


def test_nan_outputs_are_refused_with_ids(
    tmp_path: Path, teacher_dir: Path, npz_path: Path
) -> None:
    lm = load_checkpoint(teacher_dir / "member-1.pt")
    first = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)][0]
    with torch.no_grad():
        first.weight[3, 10] = float("nan")
    bad = save_checkpoint(tmp_path / "nan.pt", lm.model, lm.meta)
    spec = spec_of(npz_path, "fraction=0.5", "seed=1")
    ids = load_dataset(spec).ids
    out = tmp_path / "nan.zarr"
    with pytest.raises(CacheError) as e:
        make(out, [bad], spec)
    msg = str(e.value)
    assert "NaN or inf" in msg and "member 0" in msg
    assert (
        ids_in(msg) == ids[:20].tolist() and f"({RPS} in all)" in msg
    )  # stable ids, not row numbers
    cache = LogitCache(out, allow_partial=True)
    assert cache.count_done()[0] == 0 and not cache.complete


# ----------------------------------------------------------------------- 8b. read-time integrity
def test_a_missing_data_chunk_is_an_error_never_the_fill_value(cache_copy: Path) -> None:
    for key in ("members/1/logits/c/4/0", "labels/c/6", "ids/c/9"):
        (cache_copy / key).unlink()
    cache = LogitCache(cache_copy)  # opening reads no data chunk
    with pytest.raises(MissingChunkError, match="member 1's logits, shard 4: rows 256..319") as e:
        cache.read_logits(4)
    assert e.value.key == "members/1/logits/c/4/0"
    assert cache.read_logits(4, members=[0]).shape == (1, RPS, 5)  # member 0's shard is there
    with pytest.raises(MissingChunkError, match=r"chunk labels/c/6 \(labels, shard 6"):
        cache.read_labels(6)
    with pytest.raises(MissingChunkError, match="chunk labels/c/6"):
        cache.read_labels()  # all rows: the same refusal
    with pytest.raises(MissingChunkError, match=r"chunk ids/c/9 \(ids, shard 9: rows 576..599\)"):
        cache.read_ids()


def test_done_flags_are_read_once_per_reader(cache_copy: Path) -> None:
    """One reader is one snapshot of the finished shards: what a writer finishes later is seen by
    the next reader, never half-way through a run."""
    set_complete_flag(cache_copy, False)
    flags = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)["members/0/done"]
    flags[3] = 0
    cache = LogitCache(cache_copy, allow_partial=True)
    assert cache.done_shards().tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    flags[3] = 1  # the writer finishes shard 3
    assert cache.done_shards().tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert cache.count_done() == (19, 20) and not cache.done_flags(0)[3]
    assert LogitCache(cache_copy, allow_partial=True).done_shards().size == 10


@pytest.mark.parametrize("how", ["deleted", "zeroed"])
def test_a_complete_header_with_a_flag_not_done_is_refused(cache_copy: Path, how: str) -> None:
    if how == "deleted":
        (cache_copy / "members/1/done/c/8").unlink()
    else:
        arr = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)["members/1/done"]
        arr.with_config({"write_empty_chunks": True})[8] = 0
        assert (cache_copy / "members/1/done/c/8").is_file()
    cache = LogitCache(cache_copy)  # the header alone is usable (what cache info shows)
    with pytest.raises(
        CacheError,
        match=r"complete, but done flags are missing or zero \(member "
        r"1 shards \[8\]\).*silently train on fewer rows",
    ):
        cache.done_shards()


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_non_finite_logits_are_refused_naming_member_shard_and_ids(
    logits_cache, value: float, dtype: str
) -> None:  # noqa: ANN001
    logits = np.random.default_rng(0).normal(size=(2, 12, 3)).astype(np.float32)
    logits[:, 0, 0] = [65504.0, -65504.0]  # float16's extremes are finite: served
    location, _ = logits_cache(logits, rows_per_shard=4, dtype=dtype)
    group = zarr.open_group(str(location), mode="r+", use_consolidated=False)
    group["members/1/logits"][6, 2] = value
    cache = LogitCache(location)
    assert cache.read_logits(0)[:, 0, 0].tolist() == [65504.0, -65504.0]
    assert cache.read_logits(1, members=[0]).shape == (1, 4, 3)
    with pytest.raises(CacheError, match="member 1's logits in shard 1 hold NaN or inf") as e:
        cache.read_logits(1)
    assert ids_in(str(e.value)) == [6]


def test_labels_are_checked_for_range_and_against_the_dataset(logits_cache) -> None:  # noqa: ANN001
    labels = np.arange(12) % 3
    location, spec = logits_cache(np.zeros((1, 12, 3)), labels=labels, rows_per_shard=4)
    stored = zarr.open_group(str(location), mode="r+", use_consolidated=False)["labels"]
    stored[[1, 5, 9]] = [3, 0, -1]  # row 5 was class 2
    cache = LogitCache(location)
    with pytest.raises(
        CacheError,
        match=r"sample ids \[1\] \(1 in all\) hold labels outside "
        r"0..2 \(\[3\]\)",
    ):
        cache.read_labels(0)
    assert cache.read_labels(1).tolist() == [1, 0, 0, 1]  # a valid class: only the data can tell
    truth = load_dataset(spec).y
    with pytest.raises(
        CacheError,
        match=r"sample ids \[5\] \(1 in all\) hold labels \[0\] "
        r"where the dataset npz:.* has \[2\]: they were altered",
    ):
        cache.read_labels(1, truth=truth)
    with pytest.raises(CacheError, match=r"sample ids \[9\] .* outside 0..2 \(\[-1\]\)"):
        cache.read_labels(2, truth=truth)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            {"num_classes": 7},
            "array members/0/logits has shape (600, 5), dtype float16, chunks "
            "(64, 5); the header says shape (600, 7)",
        ),
        (
            {"n": 590},
            "array ids has shape (600,), dtype int64, chunks (64,); the header says shape (590,)",
        ),
        # Refused before zarr parses it: the read guard bounds a chunk by the header's rows per
        # shard.
        (
            {"rows_per_shard": 60},
            "ids/zarr.json declares chunks of 512 bytes (the header allows 480 per chunk of ids)",
        ),
        (
            {"dtype": "float32"},
            # refused by the read guard before zarr opens the array
            "declares data type 'float16' (the header says float32 for members/0/logits)",
        ),
    ],
)
def test_arrays_unlike_the_header_are_refused_at_open(
    cache_copy: Path, change: dict, says: str
) -> None:
    g = zarr.open_group(str(cache_copy), mode="r+", use_consolidated=False)
    h = {**g.attrs[ATTR_KEY], **change}
    if "num_classes" in change:
        h["members"] = [{**m, "num_classes": change["num_classes"]} for m in h["members"]]
    if "rows_per_shard" in change:
        h["n_shards"] = 10
    # Format 2's row layout follows n and rows_per_shard (one row per sample): the header stays
    # consistent in itself, and only the arrays disagree with it.
    h["rows"] = {**h["rows"], "n": h["n"], "per_shard": h["rows_per_shard"]}
    g.attrs[ATTR_KEY] = h
    with pytest.raises(CacheError) as e:
        LogitCache(cache_copy)
    assert says in str(e.value)
    # The read guard refuses metadata beyond the header before zarr parses it; the rest is
    # refused when the arrays are compared with the header.
    assert "the arrays disagree with the header" in str(e.value) or "declares" in says


# -------------------------------------------------------------------------------------- 9. no torch
def test_cache_module_imports_without_torch() -> None:
    code = (
        "import sys; import pipeline.cache; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cache_reads_without_torch(complete_cache: Path) -> None:
    code = (
        "import sys; from pipeline.cache import LogitCache; c = LogitCache(sys.argv[1]); "
        "print(c.read_logits(0).shape, c.n); assert 'torch' not in sys.modules"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(complete_cache)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 64, 5) 600"


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


# ------------------------------------------------------------------------------------- misc readers
def test_reader_refuses_what_is_not_a_cache(tmp_path: Path, complete_cache: Path) -> None:
    with pytest.raises(CacheError, match="no such cache"):
        LogitCache(tmp_path / "missing.zarr")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3)
    with pytest.raises(CacheError, match="no kd-pipeline cache header"):
        LogitCache(plain)
    (tmp_path / "notzarr").mkdir()
    (tmp_path / "notzarr" / "file.txt").write_text("hello")
    with pytest.raises(CacheError, match="not a Zarr store"):
        read_header(tmp_path / "notzarr")
    newer = tmp_path / "newer.zarr"
    shutil.copytree(complete_cache, newer)
    g = zarr.open_group(str(newer), mode="r+", use_consolidated=False)
    g.attrs[ATTR_KEY] = {**g.attrs[ATTR_KEY], "version": FORMAT_VERSION + 1}
    with pytest.raises(CacheError, match="upgrade kd-pipeline"):
        LogitCache(newer)


def test_existing_non_cache_directory_is_not_written_into(
    tmp_path: Path, teacher_dir: Path, dataset_spec: str
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = snapshot(out)
    with pytest.raises(CacheError, match="not a Zarr store"):
        make(out, [teacher_dir], dataset_spec)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


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
    from pipeline.cache.format import CREATING_MARKER

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
    from pipeline.cache.format import add_member_arrays

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


# ------------------------------------------------------------- 11. caches from before, bit for bit
FIXTURE = REPO / "tests" / "fixtures" / "v1-cache.zarr.zip"  # by tests/fixtures/make_v1_cache.py


def fixture_objects() -> dict[str, bytes]:
    import zipfile

    with zipfile.ZipFile(FIXTURE) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_a_cache_written_before_the_location_change_reads_and_verifies(tmp_path: Path) -> None:
    """The fixture was written by the code before CacheLocation / CacheHeader (commit 144087a)."""
    from pipeline.cache import sharing
    from pipeline.cache.format import cache_fingerprint
    from pipeline.cache.header import CacheHeader
    from tests.fixtures import make_v1_cache as v1

    given = v1.inputs()
    cache = LogitCache(FIXTURE)
    assert cache.complete and (cache.n, cache.num_classes, cache.n_shards) == (50, 5, 4)
    assert np.array_equal(cache.read_ids(), given["ids"])
    assert np.array_equal(cache.read_labels(), given["labels"])
    assert np.array_equal(cache.read_logits(3), given["logits"][:, 48:].astype(np.float16))
    assert [m.path for m in cache.members] == [m["path"] for m in given["members"]]
    assert cache.members[1].metrics["per_class_errors"] == (1, 0, 2, 0, 1)
    report = sharing.verify_cache(FIXTURE)
    assert report.ok and report.chunks_read == 24, report.problems
    # The typed header gives back the very JSON it was read from: same keys, order and values.
    raw = json.loads(fixture_objects()["zarr.json"])["attributes"][ATTR_KEY]
    header = CacheHeader.from_dict(raw)
    assert header == cache.header
    assert json.dumps(header.to_dict()) == json.dumps(raw)
    # The fingerprint as the code before the change computed it (from the raw header).
    ident = {
        "dataset": raw["dataset"]["fingerprint"],
        "members": [m["checkpoint_sha256"] for m in raw["members"]],
        "dtype": raw["dtype"],
        "n": raw["n"],
        "num_classes": raw["num_classes"],
    }
    expected = "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    assert cache_fingerprint(cache.header) == expected == cache_fingerprint(raw)
    # Copied by today's code into a directory: object for object the same bytes, and it verifies.
    res = sharing.copy_cache(FIXTURE, tmp_path / "copy.zarr", progress=False, log=lambda s: None)
    assert res.report.ok and res.copied == len(fixture_objects())
    assert {
        str(p.relative_to(tmp_path / "copy.zarr")): p.read_bytes()
        for p in (tmp_path / "copy.zarr").rglob("*")
        if p.is_file()
    } == fixture_objects()


def test_the_same_inputs_written_today_keep_every_v1_data_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_cache / write_shard / mark_complete now write format 2; a dense member's data is
    still stored exactly as format 1 stored it (same chunks, same bytes): only the header, the
    row index and the fidelity measurements are new."""
    from pipeline.cache import format as fmt
    from tests.fixtures import make_v1_cache as v1

    raw = json.loads(fixture_objects()["zarr.json"])["attributes"][ATTR_KEY]
    monkeypatch.setattr(fmt, "now", lambda: v1.FROZEN)  # the fixture's frozen timestamps
    monkeypatch.setattr(fmt, "__version__", raw["tool_version"])
    out = tmp_path / "today.zarr"
    v1.write(out)
    today = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    before = fixture_objects()
    data = [k for k in before if "/c/" in k]
    assert len(data) == 4 * (2 + 2 + 2) and [k for k in data if today[k] != before[k]] == []
    new = sorted(k.split("/c/")[0] for k in set(today) - set(before) if "/c/" in k)
    assert sorted(set(new)) == [
        "members/0/fidelity",
        "members/1/fidelity",
        "row_count",
        "row_start",
    ]
    assert json.loads(today["zarr.json"])["attributes"][ATTR_KEY]["version"] == 2


# ----------------------------------------------------------------------------- 12. the typed header
def test_header_round_trip_keeps_unknown_keys_and_order_and_is_frozen(complete_cache: Path) -> None:
    import dataclasses

    from pipeline.cache.header import CacheHeader

    raw = raw_group(complete_cache).attrs[ATTR_KEY]
    h = CacheHeader.from_dict(raw)
    assert json.dumps(h.to_dict()) == json.dumps(raw)
    assert h.members[0].index == 0 and h.dataset.sample_shape == (1, 8, 8) and h.complete
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.n = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        h.dataset.source["file"] = "elsewhere"  # nested JSON is read-only too
    # Keys this version does not know (a newer writer's, a tool's note) survive a rewrite, in place.
    extended = {**raw, "note": {"by": "someone"}, "dataset": {"x_first": 1, **raw["dataset"]}}
    extended["members"] = [{**m, "extra": [1, 2]} for m in raw["members"]]
    again = CacheHeader.from_dict(extended)
    assert json.dumps(again.to_dict()) == json.dumps(extended)
    # Changes give new headers; a key the header lacked is appended, as a dict update would.
    without = {k: v for k, v in raw.items() if k != "completed_at"}
    done = CacheHeader.from_dict(without).completed("now")
    assert list(done.to_dict())[-1] == "completed_at" and done.to_dict()["completed_at"] == "now"
    added = h.with_member({**raw["members"][1], "index": 2, "array": "members/2/logits"})
    assert len(added.members) == 3 and not added.complete and added.completed_at is None
    assert len(h.members) == 2 and h.complete


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"format": "other"}, "format is 'other', expected 'kd-pipeline-logit-cache'"),
        ({"version": 99}, "cache format version 99 is not supported"),
        ({"n_shards": 3}, "n_shards=3 does not match n=600 / rows_per_shard=64"),
        ({"dtype": "int8"}, "dtype 'int8' is not float16 or float32"),
        ({"labeled": "yes"}, "labeled should be bool, found str"),
    ],
)
def test_header_from_dict_is_as_strict_as_the_schema(
    complete_cache: Path, change: dict, says: str
) -> None:
    from pipeline.cache.header import CacheHeader, validate_header

    bad = {**raw_group(complete_cache).attrs[ATTR_KEY], **change}
    with pytest.raises(CacheError) as strict:
        CacheHeader.from_dict(bad, "here")
    with pytest.raises(CacheError) as schema:
        validate_header(bad, "here")
    assert str(strict.value) == str(schema.value) and says in str(strict.value)
    assert str(strict.value).startswith("here: ")


# --------------------------------------------------------------------------- 13. the cache location
def test_location_is_parsed_once_into_a_value() -> None:
    import pickle

    from pipeline.cache.location import CacheLocation

    d = CacheLocation.parse("data/caches/fmnist.zarr/")
    assert (d.kind, d.text, d.name, d.display) == (
        "dir",
        "data/caches/fmnist.zarr",
        "fmnist",
        "data/caches/fmnist.zarr",
    )
    assert d.local_path == Path("data/caches/fmnist.zarr")
    z = CacheLocation.parse(Path("x/fmnist.zarr.zip"))
    assert (z.kind, z.name) == ("zip", "fmnist")
    opts = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIA-SECRET",
        "client_kwargs": {"token": "t"},
    }
    u = CacheLocation.parse("s3://team/caches/fmnist.zarr", opts)
    assert (u.kind, u.name, u.local_path, u.storage_options) == ("url", "fmnist", None, opts)
    assert "AKIA-SECRET" not in repr(u) and "'t'" not in repr(u) and "127.0.0.1" in repr(u)
    assert str(u) == "s3://team/caches/fmnist.zarr"
    # Hashable and picklable (dask tasks carry it), equal by text, kind and options.
    assert pickle.loads(pickle.dumps(u)) == u and hash(pickle.loads(pickle.dumps(u))) == hash(u)
    assert u != CacheLocation.parse("s3://team/caches/fmnist.zarr")
    assert CacheLocation.parse(u) is u
    assert u.child("sub/c.zarr") == CacheLocation.parse(
        "s3://team/caches/fmnist.zarr/sub/c.zarr", opts
    )
    # Storage options only apply to URLs: a local location (one side of `cache copy`) ignores them.
    assert CacheLocation.parse("data/c.zarr", opts) == CacheLocation.parse("data/c.zarr")
    with pytest.raises(CacheError, match="no cache location given"):
        CacheLocation.parse("")
    with pytest.raises(CacheError, match="plain JSON values"):
        CacheLocation.parse("s3://team/c.zarr", {"session": object()})


def test_location_opens_each_store_once(complete_cache: Path, tmp_path: Path) -> None:
    from pipeline.cache.location import CacheLocation

    where = CacheLocation.parse(complete_cache)
    assert where.exists() and not CacheLocation.parse(tmp_path / "none.zarr").exists()
    store = where.open("r")
    assert where.open("r") is store and store.read_only and not where.open("w").read_only
    cache = LogitCache(where)
    assert cache.store is store and cache.location is where
    bundle = CacheLocation.parse(tmp_path / "c.zarr.zip")
    with pytest.raises(CacheError, match="a .zarr.zip bundle is read-only"):
        bundle.open("w")
    assert isinstance(where.lock(), CacheLock)


# ---------------------------------------------------------------------------- batched shard writes
class _RecordingStore(zarr.storage.LocalStore):
    """A local store that records the order in which keys are stored (a real store, written)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.order: list[str] = []

    async def set(self, key: str, value, byte_range=None) -> None:  # noqa: ANN001
        await super().set(key, value)
        self.order.append(key)


def _empty_cache(tmp_path: Path, members: int, n: int = 12, c: int = 5, rps: int = 4) -> Path:
    from pipeline.cache.format import create_cache

    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    np.savez(tmp_path / "d.npz", x_train=x, x_test=x, y_test=np.zeros(n, np.int64))
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}:train")
    create_cache(
        tmp_path / "c.zarr",
        dataset=data.describe(),
        ids=data.ids,
        labels=None,
        num_classes=c,
        class_names=[str(i) for i in range(c)],
        members=[
            {"path": f"m{i}.pt", "checkpoint_sha256": f"sha256:{i:064x}", "num_classes": c}
            for i in range(members)
        ],
        dtype="float16",
        rows_per_shard=rps,
        command="tests",
    )
    return tmp_path / "c.zarr"


def test_write_shards_stores_every_flag_after_all_the_batch_data(tmp_path: Path) -> None:
    """A batch of member-shards: every data chunk (logits, fidelity) is stored before the first
    done flag, so a writer killed between them leaves no flag over missing data; what is read
    back is what was given."""
    from pipeline.cache.format import write_shards

    location = _empty_cache(tmp_path, members=2)
    store = _RecordingStore(location)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    rng = np.random.default_rng(0)
    given = {(m, s): rng.normal(0, 3, (4, 5)).astype(np.float32) for m in (0, 1) for s in (0, 2)}
    write_shards(group, [(m, s, lg, np.arange(4)) for (m, s), lg in given.items()])
    written = [k for k in store.order if "/c/" in k]
    flags = [i for i, k in enumerate(written) if "/done/" in k]
    data = [i for i, k in enumerate(written) if "/done/" not in k]
    assert sorted(written[i] for i in flags) == sorted(
        f"members/{m}/done/c/{s}" for m in (0, 1) for s in (0, 2)
    )
    assert len(data) == 8 and max(data) < min(flags)  # 4 logits chunks + 4 fidelity rows first
    cache = LogitCache(location, allow_partial=True)
    assert cache.done_flags(0).tolist() == [True, False, True]
    for (m, s), lg in given.items():
        assert np.array_equal(cache.read_logits(s, [m])[0], lg.astype(np.float16))


def test_write_shards_keeps_the_items_before_a_refused_one_and_flags_nothing_after(
    tmp_path: Path,
) -> None:
    from pipeline.cache.format import write_shards

    location = _empty_cache(tmp_path, members=1)
    group = zarr.open_group(location, mode="r+", use_consolidated=False)
    good = np.ones((4, 5), np.float32)
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(
        CacheError, match=r"member 0 produced NaN or inf logits for sample ids \[6\]"
    ):
        write_shards(
            group,
            [
                (0, 0, good, np.arange(0, 4)),
                (0, 1, bad, np.arange(4, 8)),
                (0, 2, good, np.arange(8, 12)),
            ],
        )
    cache = LogitCache(location, allow_partial=True)
    assert cache.done_flags(0).tolist() == [True, False, False]
    assert np.array_equal(cache.read_logits(0)[0], good.astype(np.float16))


def test_float16_conversion_is_numpys_bit_for_bit() -> None:
    """The writer's float32 -> float16 conversion (torch's, ten times faster) rounds exactly as
    numpy's astype: ties to even, subnormals, the largest finite value, overflow to inf."""
    from pipeline.cache.kinds import as_dtype

    f16 = np.finfo(np.float16)
    special = np.array(
        [0.0, -0.0, 65504.0, -65504.0, 65519.0, 65520.0, 1e6, float(f16.tiny), 6e-8, 3e-8,
         2.9e-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2.0**-24 * 1.5],
        dtype=np.float32,
    )  # fmt: skip
    bits = np.random.default_rng(0).integers(0x33000000, 0x47800000, 2_000_000, dtype=np.uint32)
    values = np.concatenate([special, bits.view(np.float32), -bits.view(np.float32)])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    got = as_dtype(values.reshape(-1, 2), "float16").reshape(-1)
    assert got.dtype == np.float16
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    frozen = values[:6].copy()
    frozen.flags.writeable = False  # read-only input: numpy's path, the same values
    with np.errstate(over="ignore"):
        again = as_dtype(frozen, "float16")
    assert np.array_equal(again.view(np.uint16), expected[:6].view(np.uint16))
