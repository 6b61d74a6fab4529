"""``hf-image:DIR`` teachers: a tiny random ViT and ResNet built from configs and saved with their
image processors; ``cache-logits`` over a ``folder:`` dataset made here stores the logits the
model gives the processor's own ``pixel_values``, and the cache records the preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache.read import LogitCache
from pipeline.checkpoints import load_checkpoint
from pipeline.errors import ModelSpecError
from pipeline.models import build_model
from stages.cli import main
from tests.helpers.hf_models import MEAN, STD, save_resnet, save_vit
from tests.helpers.images import CLASSES, make_image_folder
from tests.helpers.optional import require

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]
def cache_logits(teacher: str, dataset: str, out: Path) -> LogitCache:
    res = CliRunner().invoke(
        main,
        ["cache-logits", "--teacher", teacher, "--dataset", dataset, "--dtype", "float32",
         "--rows-per-shard", "5", "--out", str(out), "--device", "cpu", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return LogitCache(out)


def stored(cache: LogitCache) -> np.ndarray:
    return np.concatenate([cache.read_dense(s, [0])[0] for s in range(cache.n_shards)])


def images(root: Path) -> list[Path]:
    """The folder dataset's files in its row order (sorted relative paths)."""
    top = root / "train"
    return sorted(top.rglob("*.png"), key=lambda p: p.relative_to(top).as_posix())


def processor_logits(model_dir: Path, files: list[Path]) -> torch.Tensor:
    """What the model gives its own processor's pixel_values of the original image files."""
    tf = require("transformers")
    from PIL import Image

    processor = tf.AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    model = tf.AutoModelForImageClassification.from_pretrained(
        str(model_dir), local_files_only=True
    ).eval()
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")
    with torch.no_grad():
        return model(**pixels).logits


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("PIL")
    return make_image_folder(tmp_path_factory.mktemp("hfimg") / "imgs", {"train": 4}, size=24)


@pytest.mark.filterwarnings("ignore:.*torchvision.*")
def test_a_vits_cached_logits_are_its_forward_on_its_processors_images(
    folder: Path, tmp_path: Path
) -> None:
    """The folder source resizes 24x24 -> 16x16 with Pillow (as the processor does), the teacher
    rescales and normalises: the stored logits are the model's own on the processed files."""
    vit = save_vit(tmp_path / "vit")
    cache = cache_logits(f"hf-image:{vit}", f"folder:{folder}:train:size=16", tmp_path / "c.zarr")
    want = processor_logits(vit, images(folder))
    assert cache.n == 12 and cache.num_classes == 3
    np.testing.assert_allclose(stored(cache), want.numpy(), rtol=1e-5, atol=1e-5)
    member = cache.header.to_dict()["members"][0]
    assert member["model_spec"] == f"hf-image:{vit}"
    prep = member["preprocess"]
    assert prep["size"] == [16, 16] and prep["resample"] == "bilinear"
    assert prep["rescale"] == pytest.approx(1 / 255) and prep["mean"] == MEAN
    assert prep["std"] == STD and prep["processor"] == "ViTImageProcessor"
    # The member's identity is the directory's bytes: another model there is another teacher.
    again = load_checkpoint(f"hf-image:{vit}")
    assert again.sha256 == member["checkpoint_sha256"]
    cfg = json.loads((vit / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5
    (vit / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(f"hf-image:{vit}").sha256 != member["checkpoint_sha256"]


@pytest.mark.filterwarnings("ignore:.*torchvision.*")
def test_a_resnets_resize_and_crop_follow_its_processor(folder: Path, tmp_path: Path) -> None:
    """Shortest edge / crop_pct then a centre crop, done by the teacher (torch's antialiased
    resize): close to the processor's Pillow resize, not bit-equal."""
    resnet = save_resnet(tmp_path / "resnet")
    teacher = load_checkpoint(f"hf-image:{resnet}")
    prep = teacher.meta["preprocess"]
    assert prep["shortest_edge"] == 20 and prep["crop"] == [16, 16]  # int(16 / 0.8), then 16
    files = images(folder)
    from PIL import Image

    x = torch.stack(
        [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    )
    body = teacher.model.body
    tf = require("transformers")
    processor = tf.AutoImageProcessor.from_pretrained(str(resnet), local_files_only=True)
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")
    ours = body.preprocess(x)
    assert ours.shape == pixels["pixel_values"].shape == (12, 3, 16, 16)
    # Pillow rounds resized pixels to integers; both are the same picture within that.
    assert float((ours - pixels["pixel_values"]).abs().mean()) < 0.05
    with torch.no_grad():
        logits = teacher.model(x)
        assert torch.allclose(logits, body.net(pixel_values=ours).logits)


def test_what_hf_image_cannot_honour_is_refused(tmp_path: Path) -> None:
    vit = save_vit(tmp_path / "vit")
    with pytest.raises(ModelSpecError, match="3 labels, 5 are wanted"):
        build_model(f"hf-image:{vit}", (3, 16, 16), 5)
    cfg = json.loads((vit / "preprocessor_config.json").read_text())
    (vit / "preprocessor_config.json").write_text(json.dumps({**cfg, "do_pad": True}))
    with pytest.raises(ModelSpecError, match="sets do_pad, which hf-image teachers do not apply"):
        load_checkpoint(f"hf-image:{vit}")
    (vit / "preprocessor_config.json").unlink()
    with pytest.raises(ModelSpecError, match="no preprocessor_config.json"):
        load_checkpoint(f"hf-image:{vit}")
    with pytest.raises(ModelSpecError, match="absent: no such directory"):
        build_model(f"hf-image:{tmp_path / 'absent'}", (3, 16, 16), 3)
    (tmp_path / "vit" / "config.json").unlink()
    save_vit(tmp_path / "other").joinpath("preprocessor_config.json").rename(
        vit / "preprocessor_config.json"
    )
    with pytest.raises(ModelSpecError, match="no config.json"):
        build_model(f"hf-image:{vit}", (3, 16, 16), 3)


@pytest.mark.filterwarnings("ignore:.*torchvision.*")
def test_an_hf_image_dataset_is_cached_the_same_way(folder: Path, tmp_path: Path) -> None:
    """The folder's files as a ``datasets`` image column saved to disk (``hf:DIR:SPLIT``)."""
    datasets = require("datasets")
    from PIL import Image

    files = images(folder)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}
    )
    labels = [CLASSES.index(f.parent.name) for f in files]
    ds = datasets.Dataset.from_dict(
        {"image": [Image.open(f).convert("RGB") for f in files], "label": labels},
        features=features,
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    vit = save_vit(tmp_path / "vit")
    cache = cache_logits(
        f"hf-image:{vit}", f"hf:{tmp_path / 'dd'}:train:size=16", tmp_path / "c.zarr"
    )
    want = processor_logits(vit, files)
    np.testing.assert_allclose(stored(cache), want.numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(cache.read_labels(0), labels[:5])
