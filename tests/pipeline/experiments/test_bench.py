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


def figures(p1_kd: list[float]) -> dict:
    """A bench result as run_bench records it (numbers made up; P1's KD repeats given)."""
    import statistics

    kd = statistics.median(p1_kd)
    return {
        "scale": "small",
        "rows": 10_000,
        "figures": {
            "P3 1000 classes": {
                "cache_logits_s": 2.2,
                "inference_only_s": 1.7,
                "ratio": 1.3,
                "goal": "<= 1.05",
                "runs": {"cache": [2.2, 2.2], "inference": [1.7, 1.7]},
            },
            "P3 10 classes": {
                "cache_logits_s": 1.0,
                "cache_rows_per_s": 10_000.0,
                "inference_only_s": 1.0,
                "ratio": 1.0,
                "goal": "<= 1.05",
                "runs": {"cache": [1.0, 1.0], "inference": [1.0, 1.0]},
            },
            "P5 10 classes": {
                "bytes_per_sample_per_member": 19.5,
                "raw_float32": 40,
                "ratio": 0.49,
            },
            "P4 10 classes": {
                "stream_MBps": 122,
                "reads_MBps": 350,
                "codec_MBps": 610,
                "raw_npy_MBps": 2783,
                "ratio": 0.2,
                "raw_ratio": 0.04,
                "reads_ratio": 0.13,
                "goal": ">= 0.8",
                "runs": {},
            },
            "P6 1000 classes": {
                "epoch_s": {"dense": 2.0, "topk:20": 1.0, "sampled:12": 0.9},
                "ratio": 0.5,
                "sampled_ratio": 0.45,
                "goal": "<= 1.1",
                "runs": {},
                "bytes": [
                    {
                        "classes": 1000,
                        "store": "topk:20",
                        "raw": 100,
                        "on_disk": 72.3,
                        "vs_dense_raw": 0.0362,
                    }
                ],
            },
            "P1": {
                "kd_epoch_from_cache_s": kd,
                "ce_epoch_s": 1.0,
                "ratio": kd,
                "goal": "<= 1.05",
                "loader": "memory",
                "runs": {"kd": p1_kd, "ce": [1.0, 1.0, 1.0]},
            },
            "P4 rss": {
                "raw_payload": 153 << 20,
                "budget": 15 << 20,
                "mode": "stream",
                "rss_growth": 114 << 20,
                "limit": 315 << 20,
                "ok": True,
            },
            "P2": {
                "cache_logits_s": 1.2,
                "k": 3,
                "sweep_cached_s": 4.3,
                "sweep_online_s": 7.4,
                "ideal": 0.71,
                "ratio": 0.74,
                "vs_ideal": 1.04,
                "goal": "<= 1.1 x ideal",
                "runs": {},
            },
        },
        "machine": {
            "cpu": "x",
            "cores": 2,
            "torch_threads": 2,
            "device": "cpu",
            "load_before": 0.1,
        },
    }


def test_table_rows_run_p1_to_p5_with_a_verdict() -> None:
    from pipeline.experiments.bench import format_table

    lines = format_table(figures([1.02, 1.03, 1.04])).splitlines()
    assert lines[2] == "| id | measures | value | goal | verdict |"
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| P")
    ]
    assert [r[0] for r in rows] == ["P1", "P2", "P3", "P3", "P4", "P4", "P4", "P5", "P6", "P5"]
    assert [r[4] for r in rows] == [
        "met",  # P1 1.03 <= 1.05
        "met",  # P2 1.04 x ideal <= 1.1
        "met",  # P3 10 classes 1.0
        "not met",  # P3 1000 classes 1.3 > 1.05
        "not met",  # P4 0.2 of the codec limit < 0.8
        "",  # P4 against a raw .npy read: information, no goal
        "met",  # P4 RSS 114 MiB <= 315 MiB
        "reported",  # P5
        "met",  # P6 topk epoch / dense epoch 0.5 <= 1.1
        "",  # P5 bytes per storage kind: reported
    ]
    assert "codec limit" in rows[4][1] and "72.3" in rows[9][2]
    assert "(10 classes)" in rows[2][1] and "(1000 classes)" in rows[3][1]
    # the absolute rate where the figure records it (a report from before it did not)
    assert "cache-logits 1.00s (10,000 rows/s) / inference" in rows[2][1]
    assert "rows/s" not in rows[3][1]
    assert not any(line.startswith("warning:") for line in lines)


def test_a_loaded_machine_and_disagreeing_repeats_are_flagged() -> None:
    """Under load P1 read 5.2 against <= 1.05 with no hint that the figure was unreliable."""
    from pipeline.experiments.bench import format_table

    res = figures([1.1, 5.2, 9.0])
    res["machine"]["load_before"] = 3.4
    text = format_table(res)
    p1 = next(line for line in text.splitlines() if line.startswith("| P1 |"))
    assert p1.endswith("| 5.200 | <= 1.05 | not met (unreliable) |")
    assert (
        "warning: the load average was 3.4 on 2 cores before the bench started: other "
        "processes share the CPU"
    ) in text
    assert "warning: P1: its repeats differ by 152% of their median (more than 25%)" in text


def test_bench_help_lists_every_figure() -> None:
    from click.testing import CliRunner

    from stages.cli import main

    text = CliRunner().invoke(main, ["bench", "--help"]).output
    for fig in ("P1", "P2", "P3", "P4", "P5", "P6"):
        assert fig in text
