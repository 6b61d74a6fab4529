"""``kd-pipeline sequence-study --scale quick``: every step on the shipped corpus, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.cli import main

pytestmark = [
    pytest.mark.slow,  # about a minute: a teacher, five caches and seven students
    pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
    pytest.mark.filterwarnings("ignore:Object at kd-writer.lock:UserWarning"),
]


def test_quick_sequence_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_OUTPUT_DIR", str(tmp_path))
    out = tmp_path / "study"
    res = CliRunner().invoke(main, ["sequence-study", "--scale", "quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "sequence.json").read_text())
    names = [r["name"] for r in result["students"]]
    assert names == [
        "next tokens only",
        "dense",
        "topk:1",
        "topk:8",
        "topk:32",
        "sampled:16",
        "online KD",
    ]
    for r in result["students"]:
        assert math.isfinite(r["perplexity"]) and r["wall_seconds"] > result["teacher"]["seconds"]
    size = {s: c["bytes_per_token"] for s, c in result["caches"].items()}
    assert size["topk:1"] < size["topk:8"] < size["topk:32"] < size["dense"]
    assert "| dense (s0) |" in (out / "report.md").read_text()
