"""A folder of images cached by a torchvision teacher and trained from, through the real CLI:
DataLoader workers, dask workers (bit-identical), SIGKILL and resume, a changed file named."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache.header import ATTR_KEY
from tests.helpers.images import make_image_folder, tv_weights
from tests.helpers.optional import usable
from tests.helpers.process import cli_command, kd, start

pytest.importorskip("PIL")
# A torchvision teacher where torchvision loads; otherwise (CI's CPU-only torch next to PyPI's CUDA
# torchvision) a teacher trained here on the folder: the folder's stages are tested either way.
TV = usable("torchvision")
pytestmark = pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning")

PER_CLASS = {"train": 200, "test": 50}  # 750 PNG files
ROWS_PER_SHARD = "64"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("folder")
    imgs = make_image_folder(root / "imgs", PER_CLASS)
    spec = f"folder:{imgs}:train"
    if TV:
        teacher = f"tv:resnet18:weights={tv_weights(root / 'r18.pt')}"
    else:
        teacher = str(root / "teacher")
        r = kd(
            "train-teacher", "--dataset", spec, "--model", "mlp:32", "--members", "1",
            "--epochs", "1", "--jitter", "0", "--eval", "", "--out", teacher, "--device", "cpu",
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    ref = root / "ref.zarr"
    args = ["--teacher", teacher, "--dataset", spec, "--rows-per-shard", ROWS_PER_SHARD]
    r = kd("cache-logits", *args, "--out", str(ref), "--loader-workers", "2", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return {"root": root, "imgs": imgs, "teacher": teacher, "spec": spec, "ref": ref, "args": args}


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r", use_consolidated=False)
    names = ["ids", "labels", "input_digests", "members/0/logits", "members/0/done"]
    return {n: g[n][:] for n in names}


def assert_same(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    for name in x:
        assert np.array_equal(x[name], y[name]), name


def test_cache_records_the_teacher_and_trains_a_student(setup: dict, tmp_path: Path) -> None:
    g = zarr.open_group(str(setup["ref"]), mode="r")
    h = dict(g.attrs[ATTR_KEY])
    assert h["complete"] and h["n"] == 600 and h["class_names"] == ["circle", "square", "stripes"]
    assert h["members"][0]["model_spec"].endswith(":norm=imagenet" if TV else "dropout=0.5")
    assert h["dataset"]["content"] == "input-digests"
    assert not (arrays(setup["ref"])["input_digests"] == 0).all(axis=1).any()
    r = kd("cache", "verify", str(setup["ref"]), "--dataset", setup["spec"])
    assert r.returncode == 0 and "dataset content matches (10 shards re-hashed" in r.stdout
    out = tmp_path / "run"
    r = kd(
        "train-student",
        "--cache",
        str(setup["ref"]),
        "--student",
        "cnn:channels=8,16:hidden=32",
        "--epochs",
        "1",
        "--loader-workers",
        "2",
        "--memory-budget",
        "1MiB",
        "--out",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["cache"]["loader"]["mode"] == "stream" and m["cache"]["rows_used"] == 600
    assert m["metrics"]["test"]["dataset"] == f"folder:{setup['imgs']}:test"
    assert m["metrics"]["epochs"] == 1 and 0 <= m["metrics"]["test"]["errors"] <= 150
    assert 0.0 <= m["metrics"]["teacher_agreement_transfer"] <= 1.0


@pytest.mark.slow
def test_dask_workers_write_a_bit_identical_cache(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "w2.zarr"
    r = kd("cache-logits", *setup["args"], "--out", str(out), "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same(out, setup["ref"])


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "k.zarr"
    cmd = cli_command("cache-logits", *setup["args"], "--out", str(out))
    p = start(
        [*cmd, "--loader-workers", "2", "--quiet"],
        stdout=None,
        stderr=None,
        start_new_session=True,  # its DataLoader workers die with it
    )
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and p.poll() is None:
        try:
            flags = zarr.open_group(str(out), mode="r", use_consolidated=False)["members/0/done"]
            done = int(flags[:].sum())
        except Exception:  # noqa: BLE001 - not created yet
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert 0 < done < 10, f"the kill did not land mid-cache ({done} shards done)"
    r = kd("cache-logits", *setup["args"], "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same(out, setup["ref"])


def test_a_changed_file_is_detected_and_named(setup: dict, tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    copy = tmp_path / "imgs"
    shutil.copytree(setup["imgs"], copy)
    victim = copy / "train" / "square" / "00007.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(victim)
    spec = f"folder:{copy}:train"
    r = kd("cache", "verify", str(setup["ref"]), "--dataset", spec)
    assert r.returncode == 1 and f"input(s) differ from those the cache was made on: {victim}" in (
        r.stdout
    )
    r = kd(
        "train-student",
        "--cache",
        str(setup["ref"]),
        "--dataset",
        spec,
        "--student",
        "mlp:8",
        "--epochs",
        "1",
        "--eval",
        "",
        "--out",
        str(tmp_path / "run"),
    )
    assert r.returncode == 2
    assert f"1 input(s) changed since the cache was made: {victim} (sample ids [207])" in r.stderr
    assert "Traceback" not in r.stderr
