"""The shared small rules: atomic writes, the slug, field checks, and what ``--eval`` means."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.checks import at_least, collect, in_range, one_of, positive
from pipeline.datasets import load_dataset, resolve_eval_set
from pipeline.errors import ConfigError, DatasetError
from pipeline.files import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    location_stem,
    slug,
)
from pipeline.models import build_model


# ------------------------------------------------------------------------------------ atomic writes
def test_atomic_writes_replace_the_file_and_leave_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    atomic_write_json(target, {"a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}'  # as json.dumps(indent=2)
    atomic_write_text(tmp_path / "a.csv", "x,y\r\n1,2\r\n")
    assert (tmp_path / "a.csv").read_bytes() == b"x,y\r\n1,2\r\n"  # no newline translation
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.bin", "metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "history.csv"
    target.write_text("complete")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_atomic_files_get_the_mode_a_plain_write_gets(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic").st_mode)
    assert mode == stat.S_IMODE(os.stat(plain).st_mode)  # not mkstemp's private 0600


def test_checkpoints_keep_their_archive_name(tmp_path: Path) -> None:
    """torch.save names its zip archive after the file's stem: checkpoints were written to
    ``member-0.pt.tmp`` and renamed, so their archive is ``member-0.pt/``; it must stay so."""
    model = build_model("mlp:4", (1, 2, 2), 3)
    path = save_checkpoint(
        tmp_path / "member-0.pt",
        model,
        {"model_spec": "mlp:4", "in_shape": [1, 2, 2], "num_classes": 3},
    )
    names = zipfile.ZipFile(path).namelist()
    assert names and all(n.startswith("member-0.pt/") for n in names)
    before = tmp_path / "before" / "member-0.pt.tmp"  # how save_checkpoint wrote it before
    before.parent.mkdir()
    torch.save({"x": 1}, before)
    assert {n.split("/")[0] for n in zipfile.ZipFile(before).namelist()} == {"member-0.pt"}
    assert load_checkpoint(path).meta["num_classes"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["member-0.pt"]


# ------------------------------------------------------------------------------------------- slug
SPECS = [
    "mlp:800,800",
    "mlp:30,30",
    "cnn",
    "cnn:channels=32,64:hidden=128",
    "py:pkg.mod:factory",
    "mlp:30,30:dropout=0.1",
    "torchscript:/models/net.pt",
    "fashion-mnist:train",
    "npz:/data/x.npz:train:holdout=0.1:part=rest:exclude=3:seed=0",
    "idx:/d/mnist:train:keep=7,8",
]


@pytest.mark.parametrize("spec", SPECS)
def test_slug_is_each_existing_rule(spec: str) -> None:
    # config.setting_name's rule (sweep run directories: resumes must find them again).
    assert slug(spec) == spec.replace(":", "-").replace(",", "-").replace("/", "_").replace("=", "")
    # reproduce's and cache sharing's cache names (existing caches must be found again).
    legacy = spec.replace(":", "_").replace("/", "_").replace("=", "").replace(",", "-")
    assert slug(spec, sep="_") == legacy
    assert slug(spec, sep="_", max_len=80) == legacy[-80:]
    # The CLI's run names and teacher directories: the same where a spec has no "/" or "=".
    if "/" not in spec and "=" not in spec:
        assert slug(spec) == spec.replace(":", "-").replace(",", "-")


def test_slug_examples() -> None:
    assert slug("mlp:800,800") == "mlp-800-800"
    assert slug("py:pkg.mod:f") == "py-pkg.mod-f"
    assert slug("mlp:30,30:dropout=0.1") == "mlp-30-30-dropout0.1"
    assert slug("abcdef", max_len=3) == "def"


@pytest.mark.parametrize(
    "location",
    [
        "data/caches/fmnist.zarr",
        "data/caches/fmnist.zarr/",
        "fmnist.zarr.zip",
        "s3://bucket/prefix/fmnist.zarr",
        "s3://bucket/prefix/fmnist.zarr/",
    ],
)
def test_location_stem_of_every_kind_of_cache(location: str) -> None:
    assert location_stem(location) == "fmnist"


# ----------------------------------------------------------------------------------------- checks
def test_checks_word_each_rule_once() -> None:
    assert positive("temperature", 0.0) == "temperature must be > 0, got 0.0"
    assert positive("lr", float("nan")) == "lr must be > 0, got nan"
    assert positive("grad_clip", None, optional=True) is None
    assert positive("grad_clip", -1.0, optional=True) == "grad_clip must be > 0 or None, got -1.0"
    assert in_range("alpha", 1.5, 0, 1) == "alpha must be in [0, 1], got 1.5"
    assert in_range("alpha", 1.0, 0, 1) is None
    assert in_range("dropout", 1.0, 0, 1, hi_open=True) == "dropout must be in [0, 1), got 1.0"
    assert at_least("epochs", 0, 1) == "epochs must be >= 1, got 0"
    assert at_least("jitter", -1, 0, unit="pixels") == "jitter must be >= 0 pixels, got -1"
    assert (
        one_of("optimizer", "lbfgs", ("adam", "adamw", "sgd"))
        == "optimizer must be one of adam, adamw, sgd, got 'lbfgs'"
    )
    assert (
        one_of("lr_schedule", "step", ("cosine", "constant"), prose=True)
        == "lr_schedule must be cosine or constant, got 'step'"
    )
    assert collect(None, "a", None, "b") == ["a", "b"]


# ---------------------------------------------------------------------------------- --eval meaning
def test_eval_none_is_the_test_split_and_empty_is_none(npz_path: Path) -> None:
    train = load_dataset(f"npz:{npz_path}:train:exclude=3")
    assert resolve_eval_set(None, train).spec == f"npz:{npz_path}:test"
    assert resolve_eval_set("", train) is None
    assert resolve_eval_set(f"npz:{npz_path}:test:count=10", train).spec.endswith(":count=10")
    with pytest.raises(ConfigError, match="asks for none"):
        resolve_eval_set("", train, required=True)


def test_an_unusable_default_split_is_a_warning_unless_required(tmp_path: Path) -> None:
    path = tmp_path / "train-only.npz"
    np.savez(path, x_train=np.zeros((4, 2), np.float32), y_train=np.arange(4) % 2)
    train = load_dataset(f"npz:{path}:train")
    lines: list[str] = []
    assert resolve_eval_set(None, train, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("warning: no evaluation set")
    assert "--eval SPEC" in lines[0]
    with pytest.raises(DatasetError, match="x_test"):
        resolve_eval_set(None, train, required=True)
    with pytest.raises(DatasetError, match="x_test"):  # named explicitly: an error, not a warning
        resolve_eval_set(f"npz:{path}:test", train)
    no_split = load_dataset(f"npz:{path}:train")
    no_split.spec = f"npz:{path}:other"
    assert resolve_eval_set(None, no_split) is None
    with pytest.raises(ConfigError, match="no test split for"):
        resolve_eval_set(None, no_split, required=True)
