"""transformers' own bars (``Loading weights``, ``Writing model shards``) follow kd-pipeline's
rule: drawn on a terminal, never into a log (here: the commands' output captured by a pipe);
and a library user's transformers setting is left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.data import make_corpus
from tests.helpers.optional import require

REPO = Path(__file__).resolve().parents[2]
BARS = ("Loading weights", "Writing model shards", "it/s]")


def save_llama(out: Path) -> Path:
    """A seeded 1-layer Llama over bytes (V = 256) with its weights."""
    tf = require("transformers")
    import torch

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(out)
    return out


def kd(*args: str, cwd: Path) -> str:
    """The CLI in a subprocess, stdout and stderr into one pipe (as ``> log 2>&1``)."""
    res = subprocess.run(
        [sys.executable, "-m", "stages.cli", *args, "--device", "cpu"],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout
    return res.stdout


@pytest.mark.slow  # a real teacher, cache and HF student run with output in a file (13 s)
@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_no_transformers_bars_in_a_log(tmp_path: Path) -> None:
    model = save_llama(tmp_path / "llama")
    spec = f"text:{make_corpus(tmp_path / 'c.txt', lines=30)}:train:seq=8:count=8"
    log = kd("cache-logits", "--teacher", f"hf:{model}", "--dataset", spec, "--store", "topk:4",
             "--out", str(tmp_path / "c.zarr"), cwd=tmp_path)  # fmt: skip
    log += kd("train-student", "--cache", str(tmp_path / "c.zarr"), "--student", f"hf:{model}",
              "--epochs", "1", "--eval", "", "--out", str(tmp_path / "run"),
              cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
    assert "wrote" in log
    for bar in BARS:
        assert bar not in log, log


def test_a_library_users_bar_setting_is_kept(tmp_path: Path) -> None:
    require("transformers")
    from transformers.utils import logging as hf_logging

    from pipeline.sequences.hf import HFCausalLM

    model = save_llama(tmp_path / "llama")
    hf_logging.enable_progress_bar()
    HFCausalLM(str(model))
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        HFCausalLM(str(model))
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
