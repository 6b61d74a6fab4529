"""`kd-pipeline demo` end to end on a sliver of the shipped data, and its re-use of artefacts on a
re-run.
"""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from stages.cli import main

ARGS = [
    "demo",
    "--train-subset",
    "0.02",
    "--epochs",
    "1",
    "--members",
    "2",
    "--model",
    "mlp:64",
    "--student",
    "mlp:32",
    "--student-epochs",
    "1",
    "--temperatures",
    "4",
    "--device",
    "cpu",
]


def test_demo_runs_the_stages_then_reuses_them(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = CliRunner().invoke(main, [*ARGS, "--out", str(out)])
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "demo.json").read_text())
    names = [row["model"] for row in summary["table"]]
    assert names == [
        "teacher member 0",
        "teacher member 1",
        "teacher ensemble (2)",
        "student baseline (hard labels)",
        "student distilled T=4 alpha=0.9",
    ]
    for row in summary["table"]:
        assert (
            0 <= row["errors"] <= 10_000
            and abs(row["accuracy"] - (1 - row["errors"] / 10_000)) < 1e-6
        )
    assert (out / "cache.zarr" / "zarr.json").is_file()
    assert (out / "runs" / "T4" / "student.pt").is_file()
    assert "teacher ensemble (2)" in first.output and "student distilled T=4" in first.output
    report = (out / "report.md").read_text()
    for row in summary["table"]:
        assert f"| {row['model']} | {row['errors']} |" in report
    # Three paths, not the runs' result dicts.
    dirs = [line for line in report.splitlines() if line.startswith("Run directories: ")]
    assert dirs == [f"Run directories: `{out / 'runs' / 'baseline'}`, `{out / 'runs' / 'T4'}`"]
    # Accuracy is a percentage in the terminal, as in the report and the README.
    ensemble = next(r for r in summary["table"] if r["model"] == "teacher ensemble (2)")
    shown = f"{100 * ensemble['accuracy']:.2f} %"
    assert f"| {shown} |" in report
    assert any(
        line.startswith("teacher ensemble (2)") and shown in line
        for line in first.output.splitlines()
    )
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert f"report:  {out / 'report.md'}" in first.output

    second = CliRunner().invoke(main, [*ARGS, "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "reusing the teacher" in second.output
    assert "already complete" in second.output  # the cache is not recomputed
    assert second.output.count("reusing ") == 3  # teacher + two students
    assert json.loads((out / "demo.json").read_text())["table"] == summary["table"]

    # A different teacher recipe retrains it and replaces the stale cache and students.
    third = CliRunner().invoke(main, [*ARGS[:4], "2", *ARGS[5:], "--out", str(out)])  # --epochs 2
    assert third.exit_code == 0, third.output
    assert "reusing" not in third.output and "created" in third.output


def test_demo_refuses_bad_options_before_any_work(tmp_path: Path) -> None:
    """It used to train the teacher and the baseline (146 s) before "temperature must be > 0"."""
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        main,
        [
            *ARGS[:-4],
            "--temperatures",
            "4,0",
            "--alpha",
            "2",
            "--student",
            "mlp:abc",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2, res.output
    for problem in (
        "temperature must be > 0, got 0.0",
        "alpha must be in [0, 1], got 2.0",
        "hidden widths must be positive integers",
    ):
        assert problem in res.output
    assert not out.exists()
