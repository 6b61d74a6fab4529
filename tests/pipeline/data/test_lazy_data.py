"""Lazy dataset sources (folder:, hf:, py:) and torchvision models (tv:), on real files."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import default_eval_spec, load_dataset
from pipeline.errors import DatasetError, ModelSpecError
from tests.helpers.images import CLASSES, make_image_folder, tv_weights
from tests.helpers.optional import require

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"), {"train": 20, "test": 5}, size=24)


def test_folder_ids_labels_classes_and_modifiers(folder: Path) -> None:
    data = load_dataset(f"folder:{folder}:train")
    assert len(data) == 60 and data.sample_shape == (3, 24, 24)
    assert data.class_names == list(CLASSES) and np.array_equal(data.ids, np.arange(60))
    assert np.array_equal(data.y, np.repeat([0, 1, 2], 20))  # sorted relative paths
    assert data.x.name(21) == str(folder / "train" / "square" / "00001.png")
    sub = load_dataset(f"folder:{folder}:train:exclude=1:count=10:seed=3")
    assert len(sub) == 10 and 1 not in sub.y and np.all(np.diff(sub.ids) > 0)
    # Rows of a subset are the whole split's rows with the same ids.
    assert np.array_equal(sub.x[:], data.x[sub.ids])
    assert default_eval_spec(f"folder:{folder}:train:size=16:count=5") == (
        f"folder:{folder}:test:size=16"
    )


def test_folder_preprocessing_is_recorded_and_applied(folder: Path) -> None:
    data = load_dataset(f"folder:{folder}:train:size=16:crop=12:mode=grey")
    assert data.sample_shape == (1, 12, 12) and data.x[:3].dtype == np.uint8
    rec = data.describe()
    assert rec["manifest"]["preprocess"] == {
        "mode": "grey",
        "size": 16,
        "crop": 12,
        "resample": "bilinear",
    }
    assert rec["content"] == "input-digests" and rec["fingerprint"] == data.fingerprint
    assert data.fingerprint != load_dataset(f"folder:{folder}:train:size=16").fingerprint
    with pytest.raises(DatasetError, match="crop= needs size="):
        load_dataset(f"folder:{folder}:train:crop=8")
    with pytest.raises(DatasetError, match="unknown modifier 'colour=red'"):
        load_dataset(f"folder:{folder}:train:colour=red")


def test_folder_workers_decode_the_same_bytes_matched_by_row(folder: Path) -> None:
    data = load_dataset(f"folder:{folder}:train")
    serial, d0 = data.x.read_rows(0, 60)
    data.x.set_loader(2, 7)  # batches that straddle classes; two worker processes
    data.x.plan([(0, 30), (30, 60)])
    a, da = data.x.read_rows(0, 30)
    b, db = data.x.read_rows(30, 60)
    assert np.array_equal(np.concatenate([a, b]), serial) and np.array_equal(
        np.concatenate([da, db]), d0
    )
    assert np.array_equal(data.x[[5, 2, 40]], serial[[5, 2, 40]])


def test_folder_fingerprint_is_structure_and_stable(folder: Path, tmp_path: Path) -> None:
    a = load_dataset(f"folder:{folder}:train").fingerprint
    assert a == load_dataset(f"folder:{folder}:train").fingerprint
    # A copy elsewhere is the same data; a renamed file is not.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert load_dataset(f"folder:{copy}:train").fingerprint == a
    (copy / "train" / "circle" / "00000.png").rename(copy / "train" / "circle" / "zz.png")
    assert load_dataset(f"folder:{copy}:train").fingerprint != a


def test_folder_of_mixed_sizes_needs_size(tmp_path: Path) -> None:
    from PIL import Image

    make_image_folder(tmp_path, {"train": 2}, size=16)
    Image.new("RGB", (20, 16)).save(tmp_path / "train" / "circle" / "odd.png")
    data = load_dataset(f"folder:{tmp_path}:train")
    with pytest.raises(DatasetError, match=r"odd\.png: decodes to \(3, 16, 20\).*size=S"):
        data.x[:]
    assert load_dataset(f"folder:{tmp_path}:train:size=16").x[:].shape == (7, 3, 16, 16)


def test_hf_dataset_saved_to_disk_and_parquet(tmp_path: Path) -> None:
    datasets = require("datasets")
    from PIL import Image

    rng = np.random.default_rng(1)
    pix = rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    labels = [0, 1, 2] * 4
    features = datasets.Features(
        {"img": datasets.Image(), "lab": datasets.ClassLabel(names=["x", "y", "z"])}
    )
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pix], "lab": labels}, features=features
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    data = load_dataset(f"hf:{tmp_path / 'dd'}:train:x=img:y=lab:exclude=2")
    assert data.class_names == ["x", "y", "z"] and len(data) == 8
    assert np.array_equal(data.x[:], pix[data.ids].transpose(0, 3, 1, 2))
    assert np.array_equal(data.y, np.asarray(labels)[data.ids])
    (tmp_path / "pq" / "train").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "train" / "part-0.parquet"))
    again = load_dataset(f"hf:{tmp_path / 'pq'}:train:x=img:y=lab")
    assert np.array_equal(again.x[:], pix.transpose(0, 3, 1, 2))
    with pytest.raises(DatasetError, match="no input column 'image'"):
        load_dataset(f"hf:{tmp_path / 'dd'}:train")


@pytest.fixture
def py_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "kd_user_data.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Pairs(torch.utils.data.Dataset):
                classes = ["even", "odd"]

                def __len__(self):
                    return 10

                def __getitem__(self, i):
                    return torch.full((2, 3), i, dtype=torch.float32), i % 2

            class Inputs(Pairs):
                def __getitem__(self, i):
                    return torch.arange(4, dtype=torch.uint8) + i

            def pairs():
                return Pairs()

            def inputs():
                return Inputs()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "kd_user_data"
    sys.modules.pop("kd_user_data", None)


def test_py_dataset_labeled_and_unlabeled(py_module: str) -> None:
    data = load_dataset(f"py:{py_module}:pairs:keep=1")
    assert data.class_names == ["even", "odd"] and data.ids.tolist() == [1, 3, 5, 7, 9]
    assert data.x.dtype == np.float32 and data.x[:].shape == (5, 2, 3)
    assert data.x[1].tolist() == [[3.0] * 3] * 2
    unlabeled = load_dataset(f"py:{py_module}:inputs")
    assert unlabeled.y is None and unlabeled.x[2].tolist() == [2, 3, 4, 5]


def test_tv_models_build_and_load_local_weights(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    require("torchvision")
    from pipeline.checkpoints import load_checkpoint, member_paths
    from pipeline.models import build_model

    student = build_model("tv:resnet18", (3, 32, 32), 3, (100.0, 50.0))
    assert student(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 3)
    grey = build_model("tv:mobilenet_v3_small", (1, 32, 32), 5).eval()
    assert grey(torch.zeros(1, 1, 32, 32)).shape == (1, 5)
    plain = tv_weights(tmp_path / "r18.pt")
    sd = torch.load(plain, weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ck.pt")
    a = load_checkpoint(f"tv:resnet18:weights={plain}")
    b = load_checkpoint(member_paths(f"tv:resnet18:weights={tmp_path / 'ck.pt'}")[0])
    assert a.meta["num_classes"] == 3 and a.meta["input_normalisation"]["norm"] == "imagenet"
    assert a.meta["model_spec"] == f"tv:resnet18:weights={plain}:norm=imagenet"
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    with pytest.raises(ModelSpecError, match="no weights file"):
        load_checkpoint("tv:resnet18:weights=/nonexistent.pt")
    with pytest.raises(ModelSpecError, match="no classification model 'resnet7'"):
        build_model("tv:resnet7", (3, 32, 32), 3)


def test_loader_workers_capped_to_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import lazy

    monkeypatch.setattr(lazy.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [lazy.loader_workers(n) for n in (0, 1, 2, 4)] == [0, 1, 2, 2]
    assert lazy.workers_note(2) is None and lazy.workers_note(0) is None
    assert lazy.workers_note(4) == (
        "note: --loader-workers 4 reduced to 2: this process may use 2 CPU cores, and more "
        "decoding processes would only compete for them"
    )


def test_more_loader_workers_than_cores_one_note_no_torch_warning(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's --loader-workers 4 on a machine with fewer cores: cache-logits and
    train-student start one worker per core, say so once each, and torch warns of nothing."""
    import warnings

    from click.testing import CliRunner

    from stages.cli import main

    spec = f"folder:{folder}:train:size=8:mode=grey"
    teacher, cache = tmp_path / "t", tmp_path / "c.zarr"
    common = ["--device", "cpu", "--loader-workers", "4"]
    run = CliRunner().invoke
    # One usable core, as torch's own check sees it too (it reads the same affinity mask).
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run(main, ["train-teacher", "--dataset", spec, "--model", "mlp:8", "--epochs", "1",
                       "--members", "1", "--eval", "", "--out", str(teacher),
                       "--device", "cpu"])  # fmt: skip
        c = run(main, ["cache-logits", "--teacher", str(teacher), "--dataset", spec,
                       "--out", str(cache), "--quiet", *common])  # fmt: skip
        s = run(main, ["train-student", "--cache", str(cache), "--student", "mlp:8", "--epochs",
                       "1", "--eval", f"folder:{folder}:test:size=8:mode=grey",
                       "--out", str(tmp_path / "s"), *common])  # fmt: skip
    assert [r.exit_code, c.exit_code, s.exit_code] == [0, 0, 0], r.output + c.output + s.output
    note = "note: --loader-workers 4 reduced to 1: this process may use 1 CPU core,"
    assert c.output.count(note) == 1 and s.output.count(note) == 1
    # Torch warns neither of the worker count nor of a folder's rows converted one by one.
    torch_said = ("worker processes in total", "list of numpy.ndarrays")
    assert [w for w in caught if any(t in str(w.message) for t in torch_said)] == []
