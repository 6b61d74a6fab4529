"""A cache made on one machine, used on another: ``--dataset`` points it at the local copy of its
transfer set (train-student, sweep), accepted only when the fingerprint matches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cache.config import CacheConfig
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from tests.helpers.cli import cli
from tests.helpers.data import write_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = ["--student", "mlp:16", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def teammate(tmp_path_factory: pytest.TempPathFactory, npz_path: Path, teacher_dir: Path) -> dict:
    """A cache made in directory ``alice`` from the relative spec ``npz:task.npz:train``, and
    ``bob``, another directory where the same data lives as ``data/mine.npz``."""
    import os

    root = tmp_path_factory.mktemp("team")
    alice, bob = root / "alice", root / "bob"
    (bob / "data").mkdir(parents=True)
    alice.mkdir()
    shutil.copy(npz_path, alice / "task.npz")
    shutil.copy(npz_path, bob / "data" / "mine.npz")
    here = Path.cwd()
    os.chdir(alice)
    try:
        build_cache(
            CacheConfig(
                teachers=[str(teacher_dir)],
                dataset="npz:task.npz:train",
                out=str(root / "shared.zarr"),
                rows_per_shard=128,
                device="cpu",
            ),
            log=lambda s: None,
            progress=False,
        )
    finally:
        os.chdir(here)
    return {"cache": root / "shared.zarr", "bob": bob}


def test_the_recorded_path_is_named_with_how_to_repoint_it(
    teammate: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(teammate["bob"])
    code, out = cli(
        "train-student",
        "--cache",
        str(teammate["cache"]),
        *QUICK,
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    )
    want = LogitCache(teammate["cache"]).dataset.fingerprint
    assert code == 2
    assert "cannot load the transfer set the cache records, npz:task.npz:train" in out
    assert "npz:task.npz: no such file" in out
    assert f"--dataset npz:FILE:train (accepted when its fingerprint is {want})" in out
    assert "Traceback" not in out and not (tmp_path / "run").exists()


def test_train_student_with_the_local_copy_records_what_it_used(
    teammate: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(teammate["bob"])
    out = tmp_path / "run"
    code, output = cli(
        "train-student",
        "--cache",
        str(teammate["cache"]),
        "--dataset",
        "npz:data/mine.npz:train",
        *QUICK,
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, output
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["dataset"] == "npz:data/mine.npz:train"
    rec = metrics["cache"]
    assert rec["dataset"] == "npz:data/mine.npz:train"
    assert rec["recorded_dataset"] == "npz:task.npz:train"
    assert rec["dataset_fingerprint"] == LogitCache(teammate["cache"]).dataset.fingerprint
    assert rec["rows_used"] == 600
    # The default test set follows the copy the user named, not the path the cache records.
    assert metrics["metrics"]["test"]["dataset"] == "npz:data/mine.npz:test"


def test_a_dataset_with_another_fingerprint_is_refused_naming_both(
    teammate: dict, tmp_path: Path
) -> None:
    other = write_npz(tmp_path / "other.npz", seed=7)
    code, out = cli(
        "train-student",
        "--cache",
        str(teammate["cache"]),
        "--dataset",
        f"npz:{other}:train",
        *QUICK,
        "--out",
        str(tmp_path / "run"),
    )
    from pipeline.datasets import load_dataset

    theirs = load_dataset(f"npz:{other}:train").fingerprint
    want = LogitCache(teammate["cache"]).dataset.fingerprint
    assert code == 2
    assert f"--dataset npz:{other}:train has fingerprint {theirs}" in out
    assert f"made on npz:task.npz:train with fingerprint {want}" in out
    assert not (tmp_path / "run").exists()


def test_a_missing_dataset_file_is_named_as_the_given_option(
    teammate: dict, tmp_path: Path
) -> None:
    code, out = cli(
        "train-student",
        "--cache",
        str(teammate["cache"]),
        "--dataset",
        "npz:nowhere.npz:train",
        *QUICK,
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and "error: --dataset npz:nowhere.npz:train: npz:nowhere.npz: no such" in out


def test_sweep_passes_the_local_copy_to_every_setting(
    teammate: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(teammate["bob"])
    out = tmp_path / "sweep"
    code, output = cli(
        "sweep",
        "--cache",
        str(teammate["cache"]),
        "--dataset",
        "npz:data/mine.npz:train",
        "-T",
        "2,4",
        "--alpha",
        "0.9",
        *QUICK,
        "--workers",
        "0",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, output
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert metrics["cache"]["dataset"] == "npz:data/mine.npz:train"
