"""The bench runs end to end (a smoke test: figures are measured, no thresholds are asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.experiments.bench import run_bench


@pytest.mark.slow
def test_bench_small_runs_and_writes_every_figure(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "bench.json"
    res = run_bench("small", "cpu", str(out), log=lines.append)
    saved = json.loads(out.read_text())
    assert saved["figures"].keys() == res["figures"].keys()
    figs = res["figures"]
    for key in ("P1", "P3 10 classes", "P3 1000 classes", "P4 10 classes", "P4 1000 classes"):
        assert figs[key]["ratio"] > 0
    assert figs["P1"]["loader"] == "memory"
    p2 = figs["P2"]
    assert p2["k"] == 3 and 0 < p2["ideal"] < 1 and p2["ratio"] > 0
    # The online sweep pays the teacher in every step: its trainings are slower than the cached
    # ones.
    assert p2["online_train_s"] > p2["student_train_s"]
    # P5 is exact arithmetic on the stored bytes: float16 + zstd must beat raw float32.
    assert 0 < figs["P5 10 classes"]["ratio"] < 1
    rss = figs["P4 rss"]
    assert rss["mode"] == "stream" and rss["rows_seen"] == rss["rows"]
    assert res["machine"]["cores"] >= 1 and res["rows"] == 10_000
    table = "\n".join(lines)
    assert "| P1 |" in table and "| P2 |" in table and "| P3 |" in table and "| P5 |" in table
