"""Checkpoints: self-describing, loaded with weights_only=True, ensemble directories in member
order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from pipeline.checkpoints import (
    CHECKPOINT_VERSION,
    file_sha256,
    load_checkpoint,
    load_models,
    member_paths,
    save_checkpoint,
)
from pipeline.errors import CheckpointError, KDError
from pipeline.models import build_model

SPEC = "mlp:6:dropout=0.5"
IN_SHAPE = [1, 3, 3]


def _meta(**extra: object) -> dict:
    return {
        "model_spec": SPEC,
        "in_shape": IN_SHAPE,
        "num_classes": 4,
        "class_names": list("abcd"),
        "dataset": {"spec": "npz:x.npz:train", "fingerprint": "sha256:00"},
        "metrics": {"accuracy": 0.75},
        **extra,
    }


def _model(seed: int = 0):  # noqa: ANN202
    torch.manual_seed(seed)
    return build_model(SPEC, tuple(IN_SHAPE), 4, input_stats=(0.3, 2.0))


def _x() -> torch.Tensor:
    return torch.randn(5, *IN_SHAPE, generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_identical_outputs_and_meta(tmp_path: Path) -> None:
    model = _model()
    meta = _meta(config={"epochs": 3, "nested": [1, 2, {"a": None}]})
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, meta)
    assert path == tmp_path / "sub" / "m.pt" and path.is_file()
    assert not (tmp_path / "sub" / "m.pt.tmp").exists()  # written atomically

    loaded = load_checkpoint(path)
    assert loaded.meta == meta
    assert loaded.path == path
    assert loaded.sha256 == file_sha256(path)
    assert not loaded.model.training  # loaded in eval mode
    assert (
        float(loaded.model.input_mean) == pytest.approx(0.3)
        and float(loaded.model.input_std) == 2.0
    )
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(_x()), model(_x()))
    for (k1, v1), (k2, v2) in zip(
        model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)

    ident = loaded.identity()
    assert ident == {
        "path": str(path),
        "checkpoint_sha256": loaded.sha256,
        "model_spec": SPEC,
        "num_classes": 4,
        "train_dataset": "npz:x.npz:train",
        "train_dataset_fingerprint": "sha256:00",
        "metrics": {"accuracy": 0.75},
    }


def test_the_file_is_a_plain_weights_only_blob(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", _model(), _meta())
    blob = torch.load(path, weights_only=True)
    assert blob["kd_checkpoint"] == CHECKPOINT_VERSION
    assert blob["meta"] == _meta()
    assert all(isinstance(v, torch.Tensor) for v in blob["state_dict"].values())


def test_save_requires_describing_meta(tmp_path: Path) -> None:
    for missing in ("model_spec", "in_shape", "num_classes"):
        meta = _meta()
        del meta[missing]
        with pytest.raises(KDError, match=f"missing '{missing}'"):
            save_checkpoint(tmp_path / "m.pt", _model(), meta)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "m.pt", _model(), _meta(bad=object()))
    assert not (tmp_path / "m.pt").exists()


class _Payload:
    """Unpickling this with weights_only=False would create ``marker`` (arbitrary code on load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_an_arbitrary_object_is_refused(tmp_path: Path) -> None:
    model = _model()
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save(
        {
            "kd_checkpoint": 1,
            "meta": _meta(),
            "state_dict": model.state_dict(),
            "x": _Payload(marker),
        },
        path,
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "holds a pickled Python object" in msg and str(path) in msg
    assert "weights_only" not in msg and "safe_globals" not in msg  # never advice to unpickle it
    assert not marker.exists()


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        ({"meta": {}, "state_dict": {}}, "no 'kd_checkpoint' key"),
        ([1, 2, 3], "no 'kd_checkpoint' key"),
        (
            {"kd_checkpoint": CHECKPOINT_VERSION + 1, "meta": _meta(), "state_dict": {}},
            "newer than this kd-pipeline",
        ),
        ({"kd_checkpoint": 1, "state_dict": {}}, "damaged kd-pipeline checkpoint"),
        (
            {"kd_checkpoint": 1, "meta": {"model_spec": SPEC}, "state_dict": {}},
            "damaged kd-pipeline checkpoint",
        ),
        (
            {"kd_checkpoint": "1", "meta": _meta(), "state_dict": {}},
            "damaged kd-pipeline checkpoint",
        ),
        ({"kd_checkpoint": 1, "meta": _meta()}, "damaged kd-pipeline checkpoint"),
        (
            {
                "kd_checkpoint": 1,
                "meta": _meta(),
                "state_dict": {"body.net.0.weight": torch.zeros(2)},
            },
            "weights do not fit model",
        ),
    ],
)
def test_blobs_that_are_not_checkpoints(tmp_path: Path, blob: object, fragment: str) -> None:
    path = tmp_path / "x.pt"
    torch.save(blob, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_weights_of_another_architecture_do_not_fit(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "m.pt", _model(), _meta())
    blob = torch.load(path, weights_only=True)
    blob["meta"]["model_spec"] = "mlp:7"
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="weights do not fit model 'mlp:7'"):
        load_checkpoint(path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a torch file" * 10)
    with pytest.raises(CheckpointError, match="cannot load as a kd-pipeline checkpoint"):
        load_checkpoint(garbage)
    good = save_checkpoint(tmp_path / "good.pt", _model(), _meta())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(truncated)
    assert str(truncated) in str(info.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)


def test_file_sha256_is_the_sha256_of_the_bytes_and_stable(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 9000  # > 1 MiB: more than one streamed block
    p.write_bytes(data)
    expected = "sha256:" + hashlib.sha256(data).hexdigest()
    assert file_sha256(p) == expected == file_sha256(str(p))
    p.write_bytes(data[:-1] + b"\x00")
    assert file_sha256(p) != expected
    ck = save_checkpoint(tmp_path / "m.pt", _model(), _meta())
    assert file_sha256(ck) == file_sha256(ck) == load_checkpoint(ck).sha256


# ---------------------------------------------------------------------------------------- ensembles
def test_ensemble_members_in_numeric_order(tmp_path: Path) -> None:
    for i in (10, 2, 0, 1, 11):
        save_checkpoint(tmp_path / f"member-{i}.pt", _model(seed=i), _meta(member=i))
    (tmp_path / "ensemble.json").write_text("{}")
    (tmp_path / "member-0.history.csv").write_text("epoch\n1\n")
    names = [p.name for p in member_paths(tmp_path)]
    assert names == ["member-0.pt", "member-1.pt", "member-2.pt", "member-10.pt", "member-11.pt"]
    loaded = load_models([tmp_path])
    assert [lm.meta["member"] for lm in loaded] == [0, 1, 2, 10, 11]
    # Members differ (one seed each) and each is the one saved under its name.
    with torch.no_grad():
        assert not torch.equal(loaded[0].model(_x()), loaded[1].model(_x()))
        ref = _model(seed=10).eval()
        assert torch.equal(loaded[3].model(_x()), ref(_x()))


def test_member_paths_of_a_file_and_other_directories(tmp_path: Path) -> None:
    single = save_checkpoint(tmp_path / "single.pt", _model(), _meta())
    assert member_paths(single) == [single]
    other = tmp_path / "other"
    for name in ("b.pt", "a.pt"):
        save_checkpoint(other / name, _model(), _meta())
    assert [p.name for p in member_paths(other)] == [
        "a.pt",
        "b.pt",
    ]  # no member-*.pt: every *.pt, sorted
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no \\*.pt checkpoints"):
        member_paths(empty)
    with pytest.raises(CheckpointError, match="no such checkpoint or ensemble directory"):
        member_paths(tmp_path / "nope")
    # load_models flattens paths in order: a file, then a directory's members.
    loaded = load_models([single, other])
    assert [lm.path.name for lm in loaded] == ["single.pt", "a.pt", "b.pt"]
