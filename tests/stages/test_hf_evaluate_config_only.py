"""``evaluate --model hf:DIR`` of a config-only directory: refused (exit 2) with a message that
fits evaluating, not only caching with it as a teacher."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from stages.cli import main
from tests.helpers.data import make_corpus
from tests.helpers.optional import require


def test_a_config_alone_is_not_evaluated(tmp_path: Path) -> None:
    tf = require("transformers")
    model = tmp_path / "llama"
    tf.LlamaConfig(
        vocab_size=256, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    ).save_pretrained(model)  # fmt: skip
    spec = f"text:{make_corpus(tmp_path / 'c.txt', lines=20)}:test:seq=8:count=4"
    res = CliRunner().invoke(
        main, ["evaluate", "--model", f"hf:{model}", "--dataset", spec, "--device", "cpu"]
    )
    assert res.exit_code == 2, res.output
    assert f"error: hf:{model} holds a config.json but no weights" in res.output
    assert "as a teacher or evaluated it would give random logits" in res.output
    assert f"kd-pipeline train-teacher --model hf:{model}" in res.output
