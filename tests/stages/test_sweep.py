"""``kd-pipeline sweep`` through the real CLI: click's CliRunner for output and exit codes, and a
real subprocess interrupted with Ctrl-C (SIGINT) mid-way and re-run, which must train only the
settings that were missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.cli import main
from stages.params import FIELD_ATTR

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stop_after_first_result(
    cmd: list[str], out: Path, sig: int, group: bool = False
) -> tuple[int, str]:
    """Run the sweep CLI in a subprocess, send ``sig`` once results.json exists; return (exit
    status, output). ``group``: to its whole process group, as a terminal's Ctrl-C does.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=group,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline and p.poll() is None and not (out / "results.json").exists()
        ):
            time.sleep(0.1)
        assert p.poll() is None, (
            "the sweep finished before it could be stopped: make its settings slower"
        )
        if group:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        output, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, output


def test_cli_sweep_prints_the_table_and_resumes(cache_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--cache",
        str(cache_path),
        "-T",
        "2,8",
        "--alpha",
        "0.9",
        "--student",
        "mlp:16",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--workers",
        "0",
        "--threads-per-worker",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    dry = CliRunner().invoke(main, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert (
        "2 settings = 1 students x 2 temperatures x 1 alphas x 1 seeds; 0 done, 2 to run"
        in dry.output
    )
    assert not out.exists()

    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in rows] == ["mlp-16-T2-a0.9-s0", "mlp-16-T8-a0.9-s0"]
    assert "| student | T | alpha | test errors |" in res.output
    best = min(r["test_errors"] for r in rows)
    assert f"**{best}**" in res.output
    assert "2 settings: 2 trained, 0 reused, 0 failed" in res.output
    assert f"plot:    {out / 'test_error_vs_temperature.png'}" in res.output

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "2 settings: 0 trained, 2 reused, 0 failed" in again.output


def test_cli_sweep_exit_status_1_when_a_setting_fails(cache_path: Path, tmp_path: Path) -> None:
    # torchscript:PATH names a file that is missing: the setting fails when it builds its student.
    res = CliRunner().invoke(
        main,
        [
            "sweep",
            "--cache",
            str(cache_path),
            "-T",
            "4",
            "--alpha",
            "0.9",
            "--student",
            f"torchscript:{tmp_path / 'missing.pt'}",
            "--student",
            "mlp:16",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(tmp_path / "sweep"),
        ],
    )
    assert res.exit_code == 1, res.output
    assert "1 setting(s) failed" in res.output
    assert "2 settings: 1 trained, 0 reused, 1 failed" in res.output


def test_cli_sweep_refuses_bad_grids_with_every_problem(cache_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main,
        [
            "sweep",
            "--cache",
            str(cache_path),
            "-T",
            "0,4,4",
            "--alpha",
            "2",
            "--workers",
            "2",
            "--scheduler",
            "tcp://x:1",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 2
    for part in (
        "temperature must be > 0, got 0.0",
        "temperatures has repeated values",
        "alpha must be in [0, 1]",
        "use --workers N or --scheduler ADDRESS, not both",
    ):
        assert part in res.output
    bad = CliRunner().invoke(
        main, ["sweep", "--cache", str(cache_path), "-T", "a,b", "--out", str(tmp_path / "s")]
    )
    assert bad.exit_code == 2 and "expected numbers like 1,2,4, got 'a,b'" in bad.output


def test_ctrl_c_keeps_finished_settings_and_a_rerun_completes_only_the_rest(
    cache_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "stages.cli",
        "sweep",
        "--cache",
        str(cache_path),
        "-T",
        "1,2,4,8",
        "--alpha",
        "0.5,1",
        "--student",
        "mlp:64",
        "--epochs",
        "15",
        "--batch-size",
        "32",
        "--workers",
        "2",
        "--threads-per-worker",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    # Ctrl-C in a terminal reaches the dask workers too: they must not die of it (a traceback,
    # "leaked semaphore objects" at exit).
    code, output = stop_after_first_result(cmd, out, signal.SIGINT, group=True)
    assert code == 130, output
    assert "interrupted" in output
    assert "leaked semaphore" not in output and "Traceback" not in output, output
    kept = json.loads((out / "results.json").read_text())
    assert 1 <= len(kept) < 8 and all(r["status"] == "ok" for r in kept)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"8 settings: {8 - len(kept)} trained, {len(kept)} reused, 0 failed" in rerun.stdout
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert [r for r in rows if r["setting"] in {k["setting"] for k in kept}] == kept


def test_sigterm_stops_an_in_process_sweep_like_ctrl_c(cache_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "stages.cli",
        "sweep",
        "--cache",
        str(cache_path),
        "-T",
        "1,2,4",
        "--alpha",
        "1",
        "--student",
        "mlp:64",
        "--epochs",
        "6",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    code, output = stop_after_first_result(cmd, out, signal.SIGTERM)
    assert code == 130 and "interrupted" in output, output
    kept = json.loads((out / "results.json").read_text())
    assert len(kept) == 1 and kept[0]["setting"] == "mlp-64-T1-a1-s0"
    # The setting that was running when the signal came has no metrics.json: it is not taken for
    # finished.
    assert not (out / "runs" / "mlp-64-T2-a1-s0" / "metrics.json").exists()


def test_sweep_offers_every_train_student_option_but_the_per_setting_ones() -> None:
    def flags(command: str) -> dict[str, str]:
        return {p.opts[0]: getattr(p, FIELD_ATTR) for p in main.commands[command].params}

    single, grid = flags("train-student"), flags("sweep")
    # The sweep seeds each setting from --seeds and replaces its own run directories.
    assert set(single) - set(grid) == {"--seed", "--overwrite"}
    axes = {"--temperature", "--alpha", "--student", "--out"}  # lists (and the sweep directory)
    for flag in set(single) & set(grid) - axes:
        assert grid[flag] == single[flag], flag  # the same field's declaration
    assert {grid[f] for f in axes} == {
        "SweepConfig.temperatures",
        "SweepConfig.alphas",
        "SweepConfig.students",
        "SweepConfig.out",
    }


def test_options_sweeps_once_dropped_reach_the_runs(
    npz_path: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    """--allow-partial, --class-bias, --fit-bias-on and --loader-workers reach every run's
    config.json, and act: a partial cache trains, class 3 (absent) gets a fitted bias."""
    import zarr

    cache = tmp_path / "no3.zarr"
    made = CliRunner().invoke(
        main,
        ["cache-logits", "--teacher", str(teacher_dir)]
        + ["--dataset", f"npz:{npz_path}:train:exclude=3"]  # class 3 absent: a bias to fit
        + ["--rows-per-shard", "64", "--device", "cpu", "--quiet", "--out", str(cache)],
    )
    assert made.exit_code == 0, made.output
    # An interrupted cache: shard 1 of member 0 not done.
    group = zarr.open_group(str(cache), mode="r+", use_consolidated=False)
    group["members/0/done"][1] = 0
    header = dict(group.attrs["kd_cache"])
    header["complete"] = False
    header["completed_at"] = None
    group.attrs["kd_cache"] = header
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--cache",
        str(cache),
        "-T",
        "2,4",
        "--alpha",
        "0.9",
        "--student",
        "mlp:16",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    refused = CliRunner().invoke(main, args)
    # Without --allow-partial the sweep refuses the cache before any setting, as train-student does.
    assert refused.exit_code == 2 and "the cache is partial" in refused.output, refused.output
    assert "pass --allow-partial" in refused.output and not (out / "runs").exists()
    extra = [
        "--allow-partial",
        "--class-bias",
        "1=+0.5",
        "--fit-bias-on",
        f"npz:{npz_path}:test",
        "--loader-workers",
        "0",
    ]
    res = CliRunner().invoke(main, [*args, *extra])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        config = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert config["allow_partial"] is True
        assert config["class_bias"] == {"1": 0.5}
        assert config["fit_bias_on"] == f"npz:{npz_path}:test"
        assert config["loader_workers"] == 0
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["metrics"]
        assert metrics["bias"]["fitted"]["classes"] == [3]
        assert metrics["bias"]["manual"] == {"1": 0.5}


def test_a_token_cache_sweep_reports_perplexity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Students of a token cache are ranked by test perplexity (bits per byte beside), in the
    table, results.json and the plot, not by token error counts."""
    from tests.helpers.data import make_corpus

    monkeypatch.setenv("KD_OUTPUT_DIR", str(tmp_path / "data"))
    corpus = make_corpus(tmp_path / "corpus.txt", lines=200)
    spec = f"text:{corpus}:train:seq=16:count=32"
    test = f"text:{corpus}:test:seq=16:count=8"
    common = ["--epochs", "1", "--batch-size", "16", "--eval", test, "--device", "cpu"]
    run = CliRunner().invoke
    teacher = tmp_path / "teacher"
    res = run(
        main,
        ["train-teacher", "--dataset", spec, "--model", "gpt:layers=1,dim=16,heads=2,ctx=16"]
        + ["--members", "1", "--out", str(teacher), *common],
    )
    assert res.exit_code == 0, res.output
    cache = tmp_path / "tokens.zarr"
    res = run(
        main,
        ["cache-logits", "--teacher", str(teacher), "--dataset", spec, "--store", "topk:8"]
        + ["--device", "cpu", "--quiet", "--out", str(cache)],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "sweep"
    res = run(
        main,
        ["sweep", "--cache", str(cache), "-T", "1,2", "--alpha", "0.5,1", "--workers", "0"]
        + ["--student", "gpt:layers=1,dim=8,heads=2,ctx=16", "--quiet", "--out", str(out)]
        + common,
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["metrics"]
        assert r["test_perplexity"] == metrics["test"]["perplexity"] > 1
        assert r["test_bits_per_byte"] == metrics["test"]["bits_per_byte"] > 0
    table = (out / "results.md").read_text()
    assert "| student | T | alpha | test perplexity | bits/byte | token accuracy |" in table
    assert "test errors" not in table
    best = min(r["test_perplexity"] for r in rows)
    for r in rows:
        cell = f"{r['test_perplexity']:.3f}"
        cell = f"**{cell}**" if r["test_perplexity"] == best else cell
        line = (
            f"| {r['student']} | {r['temperature']:g} | {r['alpha']:g} | {cell} | "
            f"{r['test_bits_per_byte']:.4f} |"
        )
        assert line in table, (line, table)
    assert table.count("**") == 2 and table.strip() in res.output
    first = rows[0]
    assert f"{first['setting']}: test perplexity {first['test_perplexity']:.3f}" in res.output
    plot = out / "test_perplexity_vs_temperature.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot:    {plot}" in res.output and not (out / "test_error_vs_temperature.png").exists()
