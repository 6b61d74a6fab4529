"""The cache writer (``pipeline.cache.writer.build_cache``) on real stores on disk: what it
stores (the header, the teachers' own logits), re-runs, refusals and added members, resuming a
partial cache, inputs it refuses without damaging anything, and batched shard writes.

Every cache here is made by ``build_cache`` from a real teacher ensemble over a real dataset file,
and every value is checked against the teacher's own outputs or against another real run, never
against itself.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import __version__
from pipeline.cache.config import CacheConfig
from pipeline.cache.header import ATTR_KEY, FORMAT_NAME, FORMAT_VERSION
from pipeline.cache.lock import CacheLock
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from pipeline.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from pipeline.datasets import load_dataset
from pipeline.errors import CacheError, CheckpointError
from tests.helpers.data import write_npz
from tests.helpers.writer import (
    BATCH,
    RPS,
    ids_in,
    make,
    members_of,
    model_outputs,
    raw_group,
    set_complete_flag,
    snapshot,
    spec_of,
    stored_logits,
    train,
)

# pytest resets the warning filters pipeline.cache installs; these two are expected and harmless.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


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
    from pipeline.cache.create import create_cache

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
    from pipeline.cache.write import write_shards

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
    from pipeline.cache.write import write_shards

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
