"""A torchvision built for another torch (PyPI's CUDA wheel next to a CPU torch) is named as the
cause wherever torchvision or transformers is loaded, with how to get a matching build."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import ModelSpecError


@pytest.fixture
def broken_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``torchvision`` that fails to load the way a mismatched build does."""
    pkg = tmp_path / "site" / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()


def test_the_mismatch_is_named_with_the_cpu_index(broken_torchvision: None) -> None:
    from pipeline.tv import torchvision_problem

    problem = torchvision_problem()
    assert problem is not None
    assert f"does not load with torch {torch.__version__}" in problem
    assert "(RuntimeError: operator torchvision::nms does not exist)" in problem
    assert "pip install 'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu" in (
        problem
    )


def test_no_torchvision_is_no_problem() -> None:
    from pipeline.tv import torchvision_problem

    if importlib.util.find_spec("torchvision") is None:
        assert torchvision_problem() is None


def test_a_tv_model_names_the_matching_build(broken_torchvision: None) -> None:
    from pipeline.models import build_model

    with pytest.raises(ModelSpecError, match="does not load with torch") as e:
        build_model("tv:resnet18", (3, 8, 8), 3)
    assert "--index-url https://download.pytorch.org/whl/cpu" in str(e.value)


def test_an_hf_model_that_fails_to_load_names_torchvision(
    broken_torchvision: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers imports a present torchvision; a broken one surfaced as "Could not import
    module 'GPT2LMHeadModel'", which never named it."""
    transformers = pytest.importorskip("transformers")
    from pipeline.sequences.models import HFCausalLM

    def fail(*args: object, **kw: object) -> None:
        raise ModuleNotFoundError("Could not import module 'GPT2LMHeadModel'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (lm / "model.safetensors").write_bytes(b"")  # weights: from_pretrained (a config alone: init)
    with pytest.raises(ModelSpecError) as e:
        HFCausalLM(str(lm))
    msg = str(e.value)
    assert msg.startswith(f"hf:{lm}: cannot load it (ModuleNotFoundError: Could not import")
    assert "the likely cause: the installed torchvision" in msg
    assert "--index-url https://download.pytorch.org/whl/cpu" in msg


def test_the_matching_torchvision_follows_the_torch_version() -> None:
    from pipeline.tv import matching_torchvision

    assert "pip install 'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu" in (
        matching_torchvision("2.13.0+cpu")
    )
    assert "'torchvision==0.29.*' --index-url https://download.pytorch.org/whl/cu128" in (
        matching_torchvision("2.14.1+cu128")
    )
    assert "pip install 'torchvision==0.24.*'," in matching_torchvision("2.9.1")
