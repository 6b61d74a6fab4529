"""Dataset specs, modifiers, the IDX/npz sources, fingerprints and the shipped Fashion-MNIST."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.fingerprint import fingerprint_arrays
from pipeline.data.idx import IDX_FILES
from pipeline.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    canonical_spec,
    load_dataset,
    parse_spec,
)
from pipeline.errors import DatasetError
from tests.helpers.data import idx_bytes, make_image_task, write_idx, write_npz

ALL_IDX_NAMES = [n for pair in IDX_FILES.values() for n in pair]


# ------------------------------------------------------------------------------------------ helpers
def tiny_idx_split(
    n: int = 7, h: int = 4, w: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w), dtype=np.uint8), rng.integers(0, 4, size=n).astype(
        np.uint8
    )


@pytest.fixture()
def labeled_npz(tmp_path: Path) -> Path:
    """12 rows, labels 0..3 three times each in a known order, 4 classes, float32 pixels = row
    index.
    """
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3], dtype=np.int64)
    x = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)
    path = tmp_path / "small.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:4], y_test=y[:4], num_classes=np.int64(4))
    return path


# ---------------------------------------------------------------------------------- label range
@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ([0, 1, -1, 3], "1 labels are outside 0..3 (sample ids [2] have [-1])"),
        ([0, 4, 1, 99], "2 labels are outside 0..3 (sample ids [1, 3] have [4, 99])"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused(
    tmp_path: Path, labels: list, says: str
) -> None:
    path = tmp_path / "bad.npz"
    x = np.zeros((4, 1, 2, 2), np.float32)
    np.savez(path, x_train=x, y_train=np.array(labels), num_classes=np.int64(4))
    with pytest.raises(DatasetError, match=re.escape(says)):
        load_dataset(f"npz:{path}:train")
    with pytest.raises(DatasetError, match="labels must be class indices"):
        load_dataset(f"npz:{path}:train:count=1")  # checked on the whole split, before modifiers


# ------------------------------------------------------------------------------------- spec parsing
def test_parse_spec_splits_source_args_and_modifiers() -> None:
    source, args, mods = parse_spec("npz:/some/file.npz:train:exclude=3,1:fraction=0.5:seed=7")
    assert source is DATASETS["npz"]
    assert args == ["/some/file.npz", "train"]
    assert mods == {"exclude": [1, 3], "fraction": 0.5, "seed": 7}

    source, args, mods = parse_spec("fashion-mnist:test")
    assert (source.name, args, mods) == ("fashion-mnist", ["test"], {})

    _, _, mods = parse_spec("idx:/d:train:keep=2,0,2:count=10")
    assert mods == {"keep": [0, 2], "count": 10}


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("fashion-mnist:train", "fashion-mnist:train"),
        ("fashion-mnist:train:seed=3:fraction=.5", "fashion-mnist:train:fraction=0.5:seed=3"),
        ("mnist:test:exclude=5,3,5", "mnist:test:exclude=3,5"),
        ("idx:/d:test:count=4:keep=1", "idx:/d:test:keep=1:count=4"),
        ("npz:f.npz:train:seed=0:count=2:exclude=0", "npz:f.npz:train:exclude=0:count=2:seed=0"),
    ],
)
def test_canonical_spec_orders_and_normalises_modifiers(spec: str, canonical: str) -> None:
    assert canonical_spec(*parse_spec(spec)) == canonical
    # Canonical specs are fixed points.
    assert canonical_spec(*parse_spec(canonical)) == canonical


def test_loaded_dataset_records_its_canonical_spec(labeled_npz: Path) -> None:
    ds = load_dataset(f"npz:{labeled_npz}:train:seed=1:count=5")
    assert ds.spec == f"npz:{labeled_npz}:train:count=5:seed=1"
    assert ds.modifiers == {"count": 5, "seed": 1}
    assert load_dataset(ds.spec).ids.tolist() == ds.ids.tolist()


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("cifar:train", ["unknown dataset 'cifar'", "fashion-mnist", "idx", "mnist", "npz"]),
        ("npz:only-a-file", ["npz expects npz:FILE:SPLIT"]),
        ("idx:train", ["idx expects idx:DIR:SPLIT"]),
        ("fashion-mnist", ["fashion-mnist expects fashion-mnist:SPLIT"]),
        ("fashion-mnist:count=3", ["fashion-mnist expects fashion-mnist:SPLIT"]),
        (
            "fashion-mnist:train:bogus=1",
            ["unknown modifier 'bogus=1'", "exclude, keep, fraction, count, seed"],
        ),
        ("fashion-mnist:train:exclude", ["unknown modifier 'exclude'"]),
        ("fashion-mnist:train:exclude=a", ["exclude= expects class indices", "'a'"]),
        ("fashion-mnist:train:keep=", ["keep= expects class indices"]),
        ("fashion-mnist:train:exclude=", ["exclude= expects class indices"]),
        ("fashion-mnist:train:fraction=abc", ["fraction= expects a number in (0, 1]", "'abc'"]),
        ("fashion-mnist:train:fraction=0", ["fraction= expects a number in (0, 1]"]),
        ("fashion-mnist:train:fraction=1.5", ["fraction= expects a number in (0, 1]"]),
        ("fashion-mnist:train:count=1.5", ["count= expects an integer", "'1.5'"]),
        ("fashion-mnist:train:seed=x", ["seed= expects an integer"]),
        ("fashion-mnist:train:seed=-1:count=3", ["seed= expects a non-negative integer"]),
        ("fashion-mnist:train:exclude=1:keep=2", ["use exclude= or keep=, not both"]),
        ("fashion-mnist:train:fraction=0.5:count=3", ["use fraction= or count=, not both"]),
    ],
)
def test_bad_specs_give_helpful_dataset_errors(spec: str, fragments: list[str]) -> None:
    with pytest.raises(DatasetError) as info:
        parse_spec(spec)
    for f in fragments:
        assert f in str(info.value)


# ---------------------------------------------------------------------------------------- modifiers
def test_unmodified_split_ids_are_positions(labeled_npz: Path) -> None:
    ds = load_dataset(f"npz:{labeled_npz}:train")
    assert len(ds) == 12 and ds.labeled
    assert ds.ids.tolist() == list(range(12))
    assert ds.num_classes == 4 and ds.class_names == ["0", "1", "2", "3"]
    assert ds.sample_shape == (1, 2, 2)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and ds.ids.dtype == np.int64


def test_exclude_keeps_original_ids_and_num_classes(labeled_npz: Path) -> None:
    ds = load_dataset(f"npz:{labeled_npz}:train:exclude=1,3")
    assert ds.ids.tolist() == [0, 2, 4, 6, 8, 10]
    assert ds.y.tolist() == [0, 2, 0, 2, 0, 2]
    assert ds.x[:, 0, 0, 0].tolist() == [0, 2, 4, 6, 8, 10]  # rows are the original rows
    assert ds.num_classes == 4 and len(ds.class_names) == 4
    assert ds.modifiers == {"exclude": [1, 3]}


def test_keep_only_those_classes(labeled_npz: Path) -> None:
    ds = load_dataset(f"npz:{labeled_npz}:train:keep=3")
    assert ds.ids.tolist() == [3, 7, 11]
    assert set(ds.y.tolist()) == {3}
    assert ds.num_classes == 4


def test_count_subset_is_deterministic_ordered_and_seeded(labeled_npz: Path) -> None:
    spec = f"npz:{labeled_npz}:train:count=5"
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.ids.tolist() == b.ids.tolist()
    assert len(a) == 5 and len(set(a.ids.tolist())) == 5
    assert a.ids.tolist() == sorted(a.ids.tolist())  # original order preserved
    assert np.array_equal(a.x[:, 0, 0, 0], a.ids.astype(np.float32))  # ids index the original rows
    assert np.array_equal(a.y, np.array([0, 1, 2, 3] * 3)[a.ids])
    # seed=0 is the default; other seeds draw other subsets.
    assert load_dataset(spec + ":seed=0").ids.tolist() == a.ids.tolist()
    drawn = {tuple(load_dataset(f"{spec}:seed={s}").ids.tolist()) for s in range(6)}
    assert len(drawn) > 1


def test_fraction_rounds_and_applies_after_exclude(labeled_npz: Path) -> None:
    ds = load_dataset(f"npz:{labeled_npz}:train:exclude=0:fraction=0.5:seed=3")
    assert len(ds) == round(0.5 * 9)
    assert 0 not in ds.y.tolist()
    assert set(ds.ids.tolist()) <= {1, 2, 3, 5, 6, 7, 9, 10, 11}
    assert ds.ids.tolist() == sorted(ds.ids.tolist())
    assert ds.modifiers == {"exclude": [0], "fraction": 0.5, "seed": 3}
    full = load_dataset(f"npz:{labeled_npz}:train:fraction=1")
    assert full.ids.tolist() == list(range(12))


@pytest.mark.parametrize(
    ("mods", "fragment"),
    [
        ("count=13", "the subset would hold 13 samples, but 1..12 are available"),
        ("count=0", "the subset would hold 0 samples"),
        ("fraction=0.01", "the subset would hold 0 samples"),
        ("exclude=4", "classes [4] out of range; this dataset has classes 0..3"),
        ("keep=0,1,2,3:count=13", "1..12 are available"),
    ],
)
def test_modifiers_that_cannot_apply(labeled_npz: Path, mods: str, fragment: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(f"npz:{labeled_npz}:train:{mods}")
    assert fragment in str(info.value)


def test_excluding_every_class_leaves_nothing(labeled_npz: Path) -> None:
    with pytest.raises(DatasetError, match="no samples are left"):
        load_dataset(f"npz:{labeled_npz}:train:exclude=0,1,2,3")


# --------------------------------------------------------------------------------------- npz source
def test_npz_unlabeled_split(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "u.npz", n_train=20, n_test=10, classes=5, labeled=False)
    ds = load_dataset(f"npz:{path}:train")
    assert not ds.labeled and ds.y is None
    assert ds.num_classes == 5 and len(ds) == 20
    assert ds.describe()["labeled"] is False
    assert load_dataset(f"npz:{path}:test").labeled
    # A subset works on unlabeled data; class filters need labels.
    assert len(load_dataset(f"npz:{path}:train:count=4")) == 4
    with pytest.raises(DatasetError, match="need labels"):
        load_dataset(f"npz:{path}:train:exclude=1")


def test_npz_matches_conftest_data(npz_path: Path) -> None:
    ds = load_dataset(f"npz:{npz_path}:test")
    x, y = make_image_task(300, 1, 5)
    assert np.array_equal(ds.x, x) and np.array_equal(ds.y, y)
    assert ds.source == {"file": str(npz_path.resolve())}


def test_npz_class_names_and_inferred_classes(tmp_path: Path) -> None:
    x = np.zeros((3, 2), np.float64)
    named = tmp_path / "named.npz"
    np.savez(named, x_a=x, y_a=np.array([0, 1, 0]), class_names=np.array(["cat", "dog"]))
    ds = load_dataset(f"npz:{named}:a")
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.x.dtype == np.float32  # non-uint8 inputs become float32
    inferred = tmp_path / "inferred.npz"
    np.savez(inferred, x_a=x, y_a=np.array([0, 1, 0]), x_b=x, y_b=np.array([0, 6, 2]))
    assert load_dataset(f"npz:{inferred}:a").num_classes == 7  # from every split's labels
    pix = tmp_path / "pix.npz"
    np.savez(pix, x_a=np.zeros((2, 3), np.uint8), y_a=np.array([0, 1]))
    assert load_dataset(f"npz:{pix}:a").x.dtype == np.uint8


def test_npz_errors(tmp_path: Path, labeled_npz: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}:train")
    with pytest.raises(DatasetError) as info:
        load_dataset(f"npz:{labeled_npz}:valid")
    assert "no array 'x_valid'" in str(info.value) and "x_train" in str(info.value)
    bad_rows = tmp_path / "rows.npz"
    np.savez(bad_rows, x_train=np.zeros((3, 2), np.float32), y_train=np.array([0, 1]))
    with pytest.raises(DatasetError, match="x_train has 3 rows but y_train has 2"):
        load_dataset(f"npz:{bad_rows}:train")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError, match="not a readable .npz file without pickles"):
        load_dataset(f"npz:{pickled}:train")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset(f"npz:{garbage}:train")


# --------------------------------------------------------------------------------------- IDX source
@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_loads(tmp_path: Path, gz: bool) -> None:
    images, labels = tiny_idx_split()
    write_idx(tmp_path, "train", images, labels, gz)
    ds = load_dataset(f"idx:{tmp_path}:train")
    assert ds.x.shape == (7, 1, 4, 3) and ds.x.dtype == np.uint8
    assert np.array_equal(ds.x[:, 0], images)
    assert ds.y.tolist() == labels.astype(np.int64).tolist() and ds.y.dtype == np.int64
    assert ds.num_classes == int(labels.max()) + 1
    assert ds.x.flags.writeable  # torch needs writable arrays
    assert ds.source["dir"] == str(tmp_path.resolve())


def test_idx_test_split_uses_t10k_names(tmp_path: Path) -> None:
    images, labels = tiny_idx_split(n=3, seed=1)
    write_idx(tmp_path, "test", images, labels, gz=True)
    assert np.array_equal(load_dataset(f"idx:{tmp_path}:test").x[:, 0], images)
    with pytest.raises(DatasetError, match="for split 'train' not found"):
        load_dataset(f"idx:{tmp_path}:train")


def test_idx_missing_files_lists_the_four_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(f"idx:{tmp_path}:train")
    msg = str(info.value)
    assert str(tmp_path) in msg
    for name in ALL_IDX_NAMES:
        assert name in msg


def test_idx_no_such_directory_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such directory"):
        load_dataset(f"idx:{tmp_path / 'nope'}:train")
    with pytest.raises(DatasetError, match="unknown split 'valid'"):
        load_dataset(f"idx:{tmp_path}:valid")


def test_idx_wrong_magic_names_the_file(tmp_path: Path) -> None:
    images, labels = tiny_idx_split()
    write_idx(tmp_path, "train", images, labels, gz=False)
    lab = tmp_path / IDX_FILES["train"][1]
    # An images file where a labels file belongs: magic 0x803 instead of 0x801.
    lab.write_bytes(idx_bytes(images))
    with pytest.raises(DatasetError) as info:
        load_dataset(f"idx:{tmp_path}:train")
    msg = str(info.value)
    assert (
        str(lab) in msg and "wrong magic number 0x00000803" in msg and "expected 0x00000801" in msg
    )


def test_idx_truncated_data_names_the_file(tmp_path: Path) -> None:
    images, labels = tiny_idx_split()
    write_idx(tmp_path, "train", images, labels, gz=False)
    img = tmp_path / IDX_FILES["train"][0]
    img.write_bytes(img.read_bytes()[:-5])
    with pytest.raises(DatasetError) as info:
        load_dataset(f"idx:{tmp_path}:train")
    assert str(img) in str(info.value) and "truncated" in str(info.value)


@pytest.mark.parametrize("keep", [3, 9])
def test_idx_truncated_header_names_the_file(tmp_path: Path, keep: int) -> None:
    images, labels = tiny_idx_split()
    write_idx(tmp_path, "train", images, labels, gz=False)
    img = tmp_path / IDX_FILES["train"][0]
    img.write_bytes(img.read_bytes()[:keep])  # 3: shorter than magic+count; 9: inside the dims
    with pytest.raises(DatasetError) as info:
        load_dataset(f"idx:{tmp_path}:train")
    assert str(img) in str(info.value) and "truncated" in str(info.value)


def test_idx_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    images, labels = tiny_idx_split(n=50)
    write_idx(tmp_path, "train", images, labels, gz=True)
    img = tmp_path / (IDX_FILES["train"][0] + ".gz")
    img.write_bytes(img.read_bytes()[:40])
    with pytest.raises(DatasetError) as info:
        load_dataset(f"idx:{tmp_path}:train")
    assert str(img) in str(info.value)


def test_idx_count_mismatch_names_both_files(tmp_path: Path) -> None:
    images, labels = tiny_idx_split(n=7)
    write_idx(tmp_path, "train", images, labels[:6], gz=False)
    with pytest.raises(DatasetError) as info:
        load_dataset(f"idx:{tmp_path}:train")
    msg = str(info.value)
    assert "7 images" in msg and "6 labels" in msg
    assert (
        str(tmp_path / IDX_FILES["train"][0]) in msg
        and str(tmp_path / IDX_FILES["train"][1]) in msg
    )


def test_mnist_needs_a_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KD_DATA_DIR", raising=False)
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist:train")
    msg = str(info.value)
    assert "--data-dir" in msg and "KD_DATA_DIR" in msg
    for name in ALL_IDX_NAMES:
        assert name in msg
    # With KD_DATA_DIR (or its mnist/ subdirectory) it loads.
    images, labels = tiny_idx_split(n=5, seed=2)
    write_idx(tmp_path / "mnist", "train", images, labels, gz=True)
    monkeypatch.setenv("KD_DATA_DIR", str(tmp_path))
    ds = load_dataset("mnist:train")
    assert np.array_equal(ds.x[:, 0], images) and ds.class_names == [str(i) for i in range(10)]
    monkeypatch.delenv("KD_DATA_DIR")
    assert len(load_dataset("mnist:train", data_dir=str(tmp_path / "mnist"))) == 5


# ------------------------------------------------------------------------------------- fingerprints
def test_fingerprints_follow_the_content(tmp_path: Path) -> None:
    x, y = make_image_task(30, seed=5)
    fp = fingerprint_arrays(x, y)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert fingerprint_arrays(x.copy(), y.copy()) == fp
    x2 = x.copy()
    x2[17, 0, 3, 4] += 1e-3  # one changed pixel
    assert fingerprint_arrays(x2, y) != fp
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 5
    assert fingerprint_arrays(x, y2) != fp
    assert fingerprint_arrays(x, None) != fp
    assert fingerprint_arrays(x.reshape(30, 64), y) != fp  # shape is part of it
    assert fingerprint_arrays(x.astype(np.float64), y) != fp  # dtype is part of it
    # Non-contiguous views hash like their contents.
    big = np.concatenate([x, x], axis=1)[:, :1]
    assert fingerprint_arrays(big, y) == fp


def test_dataset_fingerprint_same_data_same_fingerprint(tmp_path: Path) -> None:
    a = write_npz(tmp_path / "a.npz", n_train=40, n_test=10)
    b = write_npz(tmp_path / "b.npz", n_train=40, n_test=10)
    da, db = load_dataset(f"npz:{a}:train"), load_dataset(f"npz:{b}:train")
    assert da.fingerprint == db.fingerprint
    assert da.describe()["fingerprint"] == da.fingerprint
    assert load_dataset(f"npz:{a}:train:count=39").fingerprint != da.fingerprint
    c = write_npz(tmp_path / "c.npz", n_train=40, n_test=10, seed=9)
    assert load_dataset(f"npz:{c}:train").fingerprint != da.fingerprint


def test_input_stats_are_mean_and_std(labeled_npz: Path) -> None:
    ds = load_dataset(f"npz:{labeled_npz}:train")
    mean, std = ds.input_stats
    assert mean == pytest.approx(5.5)
    assert std == pytest.approx(float(np.arange(12).std()))
    desc = ds.describe()
    assert (
        desc["n"] == 12 and desc["sample_shape"] == [1, 2, 2] and desc["input_dtype"] == "float32"
    )
    assert desc["input_stats"] == pytest.approx([5.5, float(np.arange(12).std())])


# ---------------------------------------------------------------------------- shipped Fashion-MNIST
def test_shipped_fashion_mnist_test_split() -> None:
    ds = load_dataset("fashion-mnist:test")
    assert len(ds) == 10000
    assert ds.sample_shape == (1, 28, 28) and ds.x.dtype == np.uint8
    assert (
        ds.class_names == FASHION_MNIST_CLASSES
        and len(ds.class_names) == 10
        and ds.num_classes == 10
    )
    assert np.bincount(ds.y, minlength=10).tolist() == [1000] * 10  # the test split is balanced
    assert ds.ids.tolist() == list(range(10000))
    assert int(ds.x.max()) == 255 and int(ds.x.min()) == 0


def test_uint8_input_stats_equal_the_float_computation_exactly(tmp_path: Path) -> None:
    x = np.random.default_rng(3).integers(0, 256, size=(300, 1, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", x_train=x, y_train=np.zeros(300, dtype=np.int64))
    np.savez(
        tmp_path / "f32.npz", x_train=x.astype(np.float32), y_train=np.zeros(300, dtype=np.int64)
    )
    u8 = load_dataset(f"npz:{tmp_path / 'u8.npz'}:train").input_stats
    f32 = load_dataset(f"npz:{tmp_path / 'f32.npz'}:train").input_stats
    assert u8 == f32  # bit for bit: both are exact integer sums
    assert u8[0] == pytest.approx(float(x.mean())) and u8[1] == pytest.approx(float(x.std()))


def test_holdout_parts_are_disjoint_and_cover_the_split(labeled_npz: Path) -> None:
    rest = load_dataset(f"npz:{labeled_npz}:train:holdout=0.25:seed=3")
    held = load_dataset(f"npz:{labeled_npz}:train:holdout=0.25:part=holdout:seed=3")
    assert (
        rest.spec.endswith(":holdout=0.25:part=rest:seed=3") and len(held) == 3 and len(rest) == 9
    )
    assert sorted([*rest.ids, *held.ids]) == list(range(12))
    # Later modifiers act on the rest only: a class filter never pulls held-out rows back in.
    filtered = load_dataset(f"npz:{labeled_npz}:train:holdout=0.25:seed=3:exclude=0")
    assert set(filtered.ids) <= set(rest.ids) and 0 not in filtered.y
    assert np.array_equal(
        load_dataset(f"npz:{labeled_npz}:train:holdout=0.25:part=holdout:seed=3").ids, held.ids
    )
    with pytest.raises(DatasetError, match="part= needs holdout=F"):
        load_dataset(f"npz:{labeled_npz}:train:part=holdout")
    with pytest.raises(DatasetError, match="part= expects rest or holdout"):
        load_dataset(f"npz:{labeled_npz}:train:holdout=0.5:part=train")
    with pytest.raises(DatasetError, match=r"holdout= expects a number in \(0, 1\)"):
        load_dataset(f"npz:{labeled_npz}:train:holdout=1")


def test_idx_reads_are_memoised_per_file_version(tmp_path: Path) -> None:
    """A second load of the same IDX file is served from memory, as a copy; a changed file is read
    again.
    """
    from pipeline.data import idx

    d = tmp_path / "idx"
    d.mkdir()
    x, y = make_image_task(20, seed=2, classes=3, side=4)
    imgs = (np.clip(x, -2, 2) * 60 + 128).astype(np.uint8)[:, 0]

    def write(images: np.ndarray) -> None:
        (d / IDX_FILES["train"][0]).write_bytes(
            struct.pack(">IIII", 2051, len(images), 4, 4) + images.tobytes()
        )
        (d / IDX_FILES["train"][1]).write_bytes(
            struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes()
        )

    write(imgs)
    first = load_dataset(f"idx:{d}:train")
    first.x[:] = 0  # a caller's writes never reach the memo
    again = load_dataset(f"idx:{d}:train")
    assert np.array_equal(again.x[:, 0], imgs)
    assert any(k[0].endswith(IDX_FILES["train"][0]) for k in idx._IDX_MEMO)
    write(
        255 - imgs
    )  # new content, same size: the modification time tells (set apart explicitly here, since
    path = d / IDX_FILES["train"][0]  # two writes within one clock tick could share it)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert np.array_equal(load_dataset(f"idx:{d}:train").x[:, 0], 255 - imgs)
