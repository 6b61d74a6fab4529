"""An ``hf:DIR`` allowed with ``--trust-code`` whose ``auto_map`` names code the directory lacks:
one message naming the missing files, not transformers' pointer to the Hub (nothing is read
from there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ModelSpecError
from pipeline.sequences.hf import HFCausalLM, missing_code_files, trusted_code
from tests.helpers.optional import require


def llama_config(out: Path, auto_map: dict) -> Path:
    """A config-only 1-layer Llama directory whose config.json carries ``auto_map``."""
    tf = require("transformers")
    tf.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
    ).save_pretrained(out)  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "auto_map": auto_map}))
    return out


def test_missing_code_files_are_named(tmp_path: Path) -> None:
    model = llama_config(tmp_path / "custom", {"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    with trusted_code([str(model)]), pytest.raises(ModelSpecError) as err:
        HFCausalLM(str(model))
    message = str(err.value)
    assert f"names custom code that is not in {model}: modeling_x.py" in message
    assert "nothing is downloaded" in message and "huggingface.co" not in message


def test_which_files_count_as_missing(tmp_path: Path) -> None:
    (tmp_path / "modeling_x.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tok.py").write_text("")
    auto_map = {
        "AutoModelForCausalLM": "modeling_x.XForCausalLM",  # present
        "AutoConfig": "configuration_x.XConfig",  # absent
        "AutoTokenizer": ["pkg.tok.XTokenizer", None],  # present; None is no code
        "AutoModel": "someone/repo--modeling_y.Y",  # another repository: never downloaded
    }
    assert missing_code_files(tmp_path, auto_map) == [
        "configuration_x.py",
        "someone/repo--modeling_y.Y",
    ]
    assert missing_code_files(tmp_path, {"AutoModel": "modeling_x.X"}) == []
