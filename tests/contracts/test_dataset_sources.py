"""The contract every registered dataset source (``pipeline.datasets.DATASETS``) keeps.

For each source, a small instance is made in the test (files written in code; the shipped
Fashion-MNIST as it is; a source whose optional package is not usable here skips, saying which):

1. its spec parses to that source;
2. two opens agree: the same length, sample shape, classes, ids, labels, first samples and
   fingerprint (what a cache records and checks its transfer set against);
3. a spec without the source's arguments is refused with the registry's one error
   (``DatasetError``, naming the source's syntax), and so is a source nobody registered.

A new source is one registration plus a maker in :data:`MAKERS` (how to make a small instance):
``test_every_registered_source_has_a_maker`` fails until it has one.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.datasets import DATASETS, load_dataset, parse_spec
from pipeline.errors import DatasetError
from tests.helpers.data import make_corpus, write_idx, write_npz
from tests.helpers.optional import require

# A maker writes a small instance under a directory: (spec, data_dir or None).
Maker = Callable[[Path, pytest.MonkeyPatch], tuple[str, str | None]]


def _idx_dir(root: Path) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8)
    return write_idx(root, "train", images, (np.arange(12) % 4).astype(np.uint8), gz=True)


def _mnist(tmp: Path, _: pytest.MonkeyPatch) -> tuple[str, str]:
    _idx_dir(tmp / "mnist")  # mnist reads DATA_DIR/mnist/ (from --data-dir or $KD_DATA_DIR)
    return "mnist:train", str(tmp)


def _folder(tmp: Path, _: pytest.MonkeyPatch) -> tuple[str, None]:
    require("PIL")
    from tests.helpers.images import make_image_folder

    return f"folder:{make_image_folder(tmp / 'imgs', {'train': 3}, size=16)}:train", None


def _hf(tmp: Path, _: pytest.MonkeyPatch) -> tuple[str, None]:
    datasets = require("datasets")
    rng = np.random.default_rng(1)
    features = datasets.Features(
        {"img": datasets.Array3D((3, 4, 4), "uint8"), "lab": datasets.ClassLabel(names=["a", "b"])}
    )
    ds = datasets.Dataset.from_dict(
        {"img": rng.integers(0, 255, (6, 3, 4, 4), dtype=np.uint8), "lab": [0, 1] * 3},
        features=features,
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp / "hf"))
    return f"hf:{tmp / 'hf'}:train:x=img:y=lab", None


def _py(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, None]:
    require("torch")
    (tmp / "kd_contract_data.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Pairs(torch.utils.data.Dataset):
                classes = ["even", "odd"]

                def __len__(self):
                    return 10

                def __getitem__(self, i):
                    return torch.full((2, 3), float(i)), i % 2

            def pairs():
                return Pairs()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp))
    return "py:kd_contract_data:pairs", None


def _tokens(tmp: Path, _: pytest.MonkeyPatch) -> tuple[str, None]:
    x = np.random.default_rng(2).integers(0, 50, size=(8, 6))
    np.savez(tmp / "tok.npz", x_train=x, x_test=x[:2], vocab_size=np.int64(50))
    return f"tokens:{tmp / 'tok.npz'}:train", None


MAKERS: dict[str, Maker] = {
    "fashion-mnist": lambda tmp, _: ("fashion-mnist:test", None),
    "mnist": _mnist,
    "idx": lambda tmp, _: (f"idx:{_idx_dir(tmp / 'idx')}:train", None),
    "npz": lambda tmp, _: (f"npz:{write_npz(tmp / 't.npz', n_train=30, n_test=10)}:train", None),
    "folder": _folder,
    "hf": _hf,
    "py": _py,
    "text": lambda tmp, _: (f"text:{make_corpus(tmp / 'c.txt', lines=80)}:train:seq=16", None),
    "tokens": _tokens,
}


def test_every_registered_source_has_a_maker() -> None:
    missing = sorted(set(DATASETS) - set(MAKERS))
    assert not missing, f"add a maker to MAKERS for the dataset source(s) {missing}"


@pytest.fixture(params=sorted(DATASETS))
def made(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, str | None]:
    """(source name, the spec of a small instance, its data_dir)."""
    name = request.param
    if name not in MAKERS:
        pytest.fail(f"no maker for the dataset source {name!r} (see MAKERS)")
    spec, data_dir = MAKERS[name](tmp_path, monkeypatch)
    return name, spec, data_dir


class TestDatasetSourceContract:
    """What every dataset source keeps (see the module docstring)."""

    def test_the_spec_parses_to_its_source(self, made: tuple[str, str, str | None]) -> None:
        name, spec, _ = made
        source, args, _ = parse_spec(spec)
        assert source.name == name and len(args) == len(source.args)

    def test_two_opens_agree(self, made: tuple[str, str, str | None]) -> None:
        _, spec, data_dir = made
        a, b = load_dataset(spec, data_dir), load_dataset(spec, data_dir)
        assert len(a) == len(b) > 0
        assert a.sample_shape == b.sample_shape and len(a.sample_shape) >= 1
        assert a.class_names == b.class_names and a.num_classes == b.num_classes >= 1
        assert np.array_equal(a.ids, b.ids) and len(a.ids) == len(a)
        assert (a.y is None) == (b.y is None)
        if a.y is not None:
            assert np.array_equal(a.y, b.y) and len(a.y) == len(a)
        first = [np.asarray(d.x[:2]) for d in (a, b)]
        assert first[0].shape == (min(2, len(a)), *a.sample_shape)
        assert np.array_equal(first[0], first[1])
        assert a.fingerprint == b.fingerprint and a.fingerprint
        assert a.describe()["fingerprint"] == a.fingerprint

    def test_a_spec_without_its_arguments_is_one_error(
        self, made: tuple[str, str, str | None]
    ) -> None:
        name, _, data_dir = made
        with pytest.raises(DatasetError) as caught:
            load_dataset(name, data_dir)
        message = str(caught.value)
        assert f"{name}:" in message and "\n" not in message, message


def test_a_source_nobody_registered_is_one_error() -> None:
    with pytest.raises(DatasetError, match="'no-such-source'") as caught:
        load_dataset("no-such-source:train")
    assert "npz" in str(caught.value)  # the registered choices are listed
