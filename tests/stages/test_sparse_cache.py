"""Cache format 2 through the real CLI: ``cache-logits --store topk:K | sampled:S``, ``cache
info/verify/copy/pack`` on them, ``train-student`` from them, and format 1 caches still training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.header import ATTR_KEY
from pipeline.cache.read import LogitCache
from tests.helpers.cli import cli

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]
STORES = ("topk:2", "sampled:3")


def make_cache(teacher_dir: Path, npz: Path, out: Path, store: str, *extra: str) -> Path:
    code, output = cli(
        "cache-logits",
        "--teacher",
        str(teacher_dir),
        "--dataset",
        f"npz:{npz}:train",
        "--out",
        str(out),
        "--store",
        store,
        "--rows-per-shard",
        "128",
        "--device",
        "cpu",
        *extra,
    )
    assert code == 0, output
    return out


def member_arrays(cache: LogitCache) -> dict[str, np.ndarray]:
    """Every stored array of every member, shard by shard (as training reads them)."""
    out = {}
    for m in range(len(cache.members)):
        for s in range(cache.n_shards):
            for name, a in cache.read_member(s, m).items():
                out[f"{m}/{name}/{s}"] = a
    return out


@pytest.fixture(scope="module")
def sparse_caches(
    tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, npz_path: Path
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sparse")
    return {s: make_cache(teacher_dir, npz_path, root / f"{s[:4]}.zarr", s) for s in STORES}


# ----------------------------------------------------------------------------------- stage one
@pytest.mark.parametrize("store", STORES)
def test_sparse_caches_are_described_verified_copied_and_packed(
    sparse_caches: dict[str, Path], tmp_path: Path, store: str
) -> None:
    src = sparse_caches[store]
    code, output = cli("cache", "info", str(src), "--json")
    assert code == 0, output
    info = json.loads(output)
    assert info["version"] == 2 and info["rows"] == 600
    for m in info["members"]:
        assert m["storage"] == store
        # 5 classes: uint8 indices, float16 values; topk 2 x 3 + 5 tails x 4; sampled 3 x 3 +
        # 5 log-sum-exps x 4 (the sampling temperature, 1, is one of the recorded five)
        assert m["raw_bytes_per_row"] == {"topk:2": 26, "sampled:3": 29}[store]
        assert m["dense_bytes_per_row"] == 10 and 0 < m["bytes_per_row_on_disk"] < 60
        fid = m["fidelity"]
        assert fid["rows"] == 5 * 64 and len(fid["kept_mass_mean"]) == len(fid["temperatures"])
        assert all(0 < k <= 1 for k in fid["kept_mass_mean"])
        if store == "topk:2":
            assert all(kl is not None and kl >= 0 for kl in fid["kl_mean"])
        else:
            assert fid["kl_mean"] == [None] * len(fid["temperatures"])
    code, text = cli("cache", "info", str(src))
    assert f"storage {store}" in text and "fidelity on 320 rows" in text
    assert cli("cache", "verify", str(src))[0] == 0
    original = member_arrays(LogitCache(src))
    for dst in (tmp_path / "copy.zarr", tmp_path / "packed.zarr.zip"):
        code, output = cli("cache", "copy" if dst.suffix == ".zarr" else "pack", str(src), str(dst))
        assert code == 0, output
        assert cli("cache", "verify", str(dst))[0] == 0
        copied = member_arrays(LogitCache(dst))
        assert copied.keys() == original.keys()
        assert all(np.array_equal(copied[k], original[k]) for k in original)


def test_a_resumed_sparse_cache_draws_and_stores_the_same_bytes(
    sparse_caches: dict[str, Path], tmp_path: Path, teacher_dir: Path, npz_path: Path
) -> None:
    """Shards 1 and 3 lost (flags cleared, as after a kill) and recomputed: bit-identical, sampled
    draws included (seeded by cache seed, member and shard)."""
    src = sparse_caches["sampled:3"]
    part = tmp_path / "part.zarr"
    shutil.copytree(src, part)
    g = zarr.open_group(str(part), mode="r+", use_consolidated=False)
    for m in (0, 1):
        for s in (1, 3):
            g[f"members/{m}/done"][s] = 0
            g[f"members/{m}/values"][s * 128 : (s + 1) * 128] = 0
    g.attrs[ATTR_KEY] = {**g.attrs[ATTR_KEY], "complete": False, "completed_at": None}
    make_cache(teacher_dir, npz_path, part, "sampled:3")
    want, got = member_arrays(LogitCache(src)), member_arrays(LogitCache(part))
    assert [k for k in want if not np.array_equal(want[k], got[k])] == []
    src_fid = zarr.open_group(str(src), mode="r")["members/0/fidelity"][:]
    part_fid = zarr.open_group(str(part), mode="r")["members/0/fidelity"][:]
    assert np.array_equal(part_fid, src_fid, equal_nan=True)  # sampled rows have no KL: NaN


def test_another_store_for_an_existing_cache_is_refused(
    sparse_caches: dict[str, Path], tmp_path: Path, teacher_dir: Path, npz_path: Path
) -> None:
    out = tmp_path / "c.zarr"
    shutil.copytree(sparse_caches["topk:2"], out)
    code, output = cli(
        "cache-logits",
        "--teacher",
        str(teacher_dir),
        "--dataset",
        f"npz:{npz_path}:train",
        "--out",
        str(out),
        "--store",
        "sampled:3",
    )
    assert code == 2 and "already holds a different cache" in output
    assert "storage: the cache stores its members topk:2" in output
    assert "Traceback" not in output


def test_verify_and_training_refuse_damaged_sparse_rows(
    sparse_caches: dict[str, Path], tmp_path: Path, npz_path: Path
) -> None:
    out = tmp_path / "bad.zarr"
    shutil.copytree(sparse_caches["topk:2"], out)
    g = zarr.open_group(str(out), mode="r+", use_consolidated=False)
    g["members/1/indices"][130, 0] = 9  # a class the teacher does not have (5 classes)
    g["members/0/values"][5, :] = [-1.0, 3.0]  # no longer sorted descending
    code, output = cli("cache", "verify", str(out))
    assert code == 1
    assert "member 1 (topk:2): indices outside 0..4 in rows [130]" in output
    assert "member 0 (topk:2): values are not sorted descending in rows [5]" in output
    code, output = cli(
        "train-student", "--cache", str(out), "--out", str(tmp_path / "run"), "--epochs", "1"
    )
    # Training reads what verify checks: the first damaged shard it reads is refused.
    assert code == 2 and "member 0 (topk:2), shard 0 (cache rows 0..127)" in output
    assert "values are not sorted descending in rows [5]" in output
    assert "Traceback" not in output


# ----------------------------------------------------------------------------------- stage two
def train(cache: Path, out: Path, *extra: str) -> tuple[dict, str]:
    code, output = cli(
        "train-student",
        "--cache",
        str(cache),
        "--student",
        "mlp:32",
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    )
    assert code == 0, output
    return json.loads((out / "metrics.json").read_text()), output


def test_students_train_from_every_kind_with_exactness_recorded(
    sparse_caches: dict[str, Path], cache_path: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    dense, _ = train(cache_path, tmp_path / "dense", "-T", "4")
    assert dense["cache"]["soft_targets"] == {
        "storage": ["dense", "dense"],
        "format_version": 2,
        "exact": True,
    }
    base = dense["metrics"]["test"]["errors"]
    topk, out = train(sparse_caches["topk:2"], tmp_path / "topk", "-T", "4")
    st = topk["cache"]["soft_targets"]
    assert st["exact"] is True and st["storage"] == ["topk:2", "topk:2"]
    assert "(K+1)-bucket" in st["loss_matches"] and "note" not in st
    assert "note:" not in out
    # 2 of 5 classes + the exact tail: close to dense on this easy task.
    assert abs(topk["metrics"]["test"]["errors"] - base) <= 0.1 * 300
    assert topk["cache"]["fingerprint"] != dense["cache"]["fingerprint"]
    off, out = train(sparse_caches["topk:2"], tmp_path / "topk3", "-T", "3")
    assert off["cache"]["soft_targets"]["exact"] is False
    assert "T=3.0 is not a recorded temperature" in off["cache"]["soft_targets"]["note"]
    assert "note: T=3.0 is not a recorded temperature" in out
    sampled, _ = train(sparse_caches["sampled:3"], tmp_path / "sampled", "-T", "1")
    assert "unbiased" in sampled["cache"]["soft_targets"]["loss_matches"]
    # It learns (5 classes: 240 errors is chance), though 3 fixed draws per row are a noisy
    # target for a student that sees each row every epoch (see the README's sparse section).
    assert sampled["metrics"]["test"]["errors"] < 0.7 * 300
    mse, _ = train(sparse_caches["topk:2"], tmp_path / "mse", "--loss", "logit-mse")
    assert mse["cache"]["soft_targets"]["loss_matches"].startswith("the kept logits only")


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--loss", "logit-mse"], "--loss logit-mse needs dense or topk members"),
        (["--ensemble", "mean-logits"], "--ensemble mean-logits (a geometric mean) needs"),
    ],
)
def test_what_sampled_members_cannot_do_is_refused_before_training(
    sparse_caches: dict[str, Path], tmp_path: Path, extra: list[str], says: str
) -> None:
    code, output = cli(
        "train-student", "--cache", str(sparse_caches["sampled:3"]), "--out", str(tmp_path), *extra
    )
    assert code == 2 and says in output and "Traceback" not in output
    assert not (tmp_path / "config.json").exists()


def test_a_format_1_cache_still_trains_exactly_as_its_format_2_twin(
    cache_path: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    """A dense format 2 cache with its format 2 parts removed is a format 1 cache: the same
    fingerprint, the same targets, the same student, bit for bit."""
    v1 = tmp_path / "v1.zarr"
    shutil.copytree(cache_path, v1)
    for name in ("row_start", "row_count", "members/0/fidelity", "members/1/fidelity"):
        shutil.rmtree(v1 / name)
    g = zarr.open_group(str(v1), mode="r+", use_consolidated=False)
    h = dict(g.attrs[ATTR_KEY])
    h["version"] = 1
    h.pop("rows")
    h.pop("seed")
    h["members"] = [{k: v for k, v in m.items() if k != "storage"} for m in h["members"]]
    g.attrs[ATTR_KEY] = h
    zarr.consolidate_metadata(str(v1))
    assert cli("cache", "verify", str(v1))[0] == 0
    old, _ = train(v1, tmp_path / "old")
    new, _ = train(cache_path, tmp_path / "new")
    assert old["cache"]["fingerprint"] == new["cache"]["fingerprint"]
    assert old["cache"]["soft_targets"]["format_version"] == 1
    assert old["metrics"]["test"] == new["metrics"]["test"]
