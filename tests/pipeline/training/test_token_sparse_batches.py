"""A batch of token sequences from a sparse cache, as a user's loop sees it: ``top_class`` of the
grouped (B, P) targets ``CacheDataset`` serves, and the plain-loop example given a token cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.api import CacheDataset, SparseTargets
from stages.cli import main
from tests.helpers.data import make_corpus

REPO = Path(__file__).resolve().parents[3]
pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


def topk_of(logits: torch.Tensor, k: int) -> SparseTargets:
    """Exact top-``k`` targets of dense (M, rows, C) logits at T = 1 (the tail's log-mass in
    ``rest``), built as the cache reader builds them."""
    logp = logits.log_softmax(-1)
    kept, index = logp.topk(k, dim=-1)
    rest = (1 - kept.exp().sum(-1)).clamp_min(1e-12).log()
    values = logits.gather(-1, index)
    return SparseTargets("topk", index, kept, rest, torch.ones_like(kept), values,
                         logits.shape[-1], "mean-probs")  # fmt: skip


def test_top_class_of_grouped_targets_is_per_position() -> None:
    """Grouped (M, B, P, K) targets give (B, P) top classes: the dense batch's ``argmax(-1)``
    (before, ``probs`` assumed (M, B, K) and failed with an unpacking error)."""
    g = torch.Generator().manual_seed(0)
    members, batch, positions, classes = 2, 3, 5, 7
    logits = torch.randn(members, batch * positions, classes, generator=g)
    flat = topk_of(logits, classes)  # every class kept: the exact mean of the members' probs
    grouped = flat.grouped(positions)
    dense_top = logits.softmax(-1).mean(0).argmax(-1).reshape(batch, positions)
    assert grouped.is_grouped
    assert torch.equal(grouped.top_class(), dense_top)
    assert torch.equal(grouped.top_class().reshape(-1), flat.top_class())
    probs = grouped.probs()
    assert probs.shape == (batch, positions, classes)
    assert torch.allclose(probs.reshape(-1, classes), flat.probs())


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """A top-k token cache of a briefly trained 1-layer gpt over 16 sequences of 8 tokens."""
    root = tmp_path_factory.mktemp("token-batches")
    spec = f"text:{make_corpus(root / 'c.txt', lines=40)}:train:seq=8:count=16"
    for args in (
        ["train-teacher", "--dataset", spec, "--model", "gpt:layers=1,dim=16,heads=2",
         "--members", "1", "--epochs", "1", "--eval", "", "--out", str(root / "teacher")],
        ["cache-logits", "--teacher", str(root / "teacher"), "--dataset", spec,
         "--store", "topk:4", "--out", str(root / "t.zarr"), "--quiet"],
    ):  # fmt: skip
        res = CliRunner().invoke(main, [*args, "--device", "cpu"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    return root / "t.zarr"


def test_a_served_token_batch_has_per_position_top_classes(token_cache: Path) -> None:
    ds = CacheDataset(token_cache, temperature=1.0)
    batch = next(iter(ds.loader(batch_size=4)))
    targets = batch["targets"]
    assert isinstance(targets, SparseTargets) and targets.is_grouped
    top = targets.top_class()
    assert top.shape == batch["inputs"].shape == (4, 8)
    assert torch.equal(top.reshape(-1), targets.flat().top_class())


def test_the_plain_loop_example_refuses_a_token_cache(token_cache: Path) -> None:
    """The MLP example names the example that fits instead of failing inside its loop."""
    res = subprocess.run(
        [sys.executable, str(REPO / "examples" / "plain_loop.py"), str(token_cache)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "is a token cache (sequences of 8 tokens)" in res.stderr
    assert "examples/hf_trainer.py" in res.stderr
