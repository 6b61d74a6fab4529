"""An ``hf-image:DIR`` whose config.json names custom modelling code (``auto_map``): refused in
kd-pipeline's terms (exit 2, nothing imported), never with transformers' advice to pass
``trust_remote_code=True``, which no kd-pipeline option does for image classifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.models import build_model
from stages.cli import main
from tests.helpers.hf_models import save_vit

pytestmark = pytest.mark.filterwarnings("ignore:.*torchvision.*")


def with_custom_code(vit: Path, model_type: str) -> Path:
    """``vit`` re-labelled as ``model_type`` with an ``auto_map`` to a module in the directory
    whose import would leave a marker file: proof of whether it ran."""
    cfg = json.loads((vit / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoModelForImageClassification": "modeling_x.XForImageClassification"}
    (vit / "config.json").write_text(json.dumps(cfg))
    (vit / "modeling_x.py").write_text(
        f"open({str(vit / 'RAN')!r}, 'w').write('imported')\n"
        "from transformers import ViTForImageClassification as XForImageClassification\n"
    )
    return vit


def test_custom_code_is_refused_with_one_message(tmp_path: Path) -> None:
    vit = with_custom_code(save_vit(tmp_path / "xnet"), "xnet")
    res = CliRunner().invoke(
        main,
        ["cache-logits", "--teacher", f"hf-image:{vit}", "--dataset", "fashion-mnist:train:count=8",
         "--out", str(tmp_path / "c.zarr"), "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    message = res.output.strip()
    assert message.startswith(f"error: hf-image:{vit}: its config.json names custom modelling code")
    assert "(auto_map: modeling_x.XForImageClassification)" in message
    assert "--trust-code does not apply" in message and "trust_remote_code" not in message
    assert not (vit / "RAN").exists() and not (tmp_path / "c.zarr").exists()


def test_an_auto_map_beside_a_shipped_architecture_loads_that_architecture(
    tmp_path: Path,
) -> None:
    """With model_type ``vit`` transformers uses its own ViT class; the directory's code never
    runs (unchanged behaviour: the refusal above is only for code that would be needed)."""
    vit = with_custom_code(save_vit(tmp_path / "vit"), "vit")
    model = build_model(f"hf-image:{vit}", (3, 16, 16), 3)
    assert "ViTForImageClassification" in {type(m).__name__ for m in model.modules()}
    assert not (vit / "RAN").exists()
