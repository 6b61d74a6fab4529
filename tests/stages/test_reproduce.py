"""``kd-pipeline reproduce --scale quick`` on a small synthetic npz dataset through the real CLI:
every experiment runs over the public stages, the report and its figures agree with the run
directories, and a re-run reuses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.experiments.reproduce.recipes import MAIN_RECIPE
from stages.cli import main
from tests.helpers.data import write_npz

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("reproduce")
    data = write_npz(root / "task.npz", n_train=600, n_test=300)
    out = root / "out"
    res = CliRunner().invoke(
        main,
        [
            "reproduce",
            "--dataset",
            f"npz:{data}",
            "--scale",
            "quick",
            "--kept-classes",
            "0,1",
            "--student",
            "mlp:32",
            "--narrow-student",
            "mlp:4",
            "--main-student",
            "mlp:32",
            "--seeds",
            "0,1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    (root / "first-report.md").write_text((out / "report.md").read_text())  # a re-run rewrites it
    return data, out, res.output


def test_every_experiment_reports_next_to_the_paper(reproduced: tuple[Path, Path, str]) -> None:
    _, out, output = reproduced
    report = (out / "report.md").read_text()
    for name in ("main-table", "temperature", "omitted-class", "small-data"):
        assert f"## {name}" in report and f"{name}: " in output
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "baseline 800-800 student 146" in report and "206 test errors" in report
    assert "errors at its best T >= 8 vs" in report and "at its best overall (" in report
    summary = json.loads((out / "reproduce.json").read_text())
    assert set(summary["experiments"]) == {
        "main-table",
        "temperature",
        "omitted-class",
        "small-data",
    }


def test_report_figures_are_the_run_directories_own(reproduced: tuple[Path, Path, str]) -> None:
    _, out, _ = reproduced
    figs = json.loads((out / "reproduce.json").read_text())["experiments"]
    main_table = figs["main-table"]["figures"]
    arms = main_table["arms"]
    recipe = main_table["recipe"]
    views = recipe["views"]
    # The fair protocol: the same student, epochs and seeds in every arm, each run's epoch chosen
    # on the held-out validation split, which the transfer set (and the teacher) never saw.
    assert main_table["validation"].endswith(":train:holdout=0.1:part=holdout:seed=0")
    distilled = next(a for a in arms if a.startswith("distilled"))
    names = {"baseline: hard labels": "baseline"}
    if views:  # the control: hard labels on the distilled student's views
        names[f"hard labels on the same {views} views"] = f"hard-views{views}"
    names[distilled] = f"distilled-T{recipe['temperature']:g}-a{recipe['alpha']:g}-v{views}"
    assert list(arms) == list(names)
    for label, name in names.items():
        errors, chosen = [], []
        for seed in (0, 1):
            run = json.loads(
                (out / f"runs/main-table/mlp-32/{name}-s{seed}/metrics.json").read_text()
            )
            cfg = run["config"]
            assert cfg["train"]["seed"] == seed and cfg["train"]["epochs"] == 8
            assert cfg["val"] == main_table["validation"] and cfg["student"] == "mlp:32"
            assert run["metrics"]["selection"]["on"] == main_table["validation"]
            assert run["cache"]["dataset"].endswith(":train:holdout=0.1:part=rest:seed=0")
            assert cfg["alpha"] == (recipe["alpha"] if label == distilled else 0.0)
            errors.append(run["metrics"]["test"]["errors"])
            chosen.append(run["metrics"]["selection"]["epoch"])
        assert arms[label]["errors"] == errors and arms[label]["chosen_epochs"] == chosen
        assert arms[label]["errors_mean"] == sum(errors) / 2
    base, dist = arms["baseline: hard labels"], arms[distilled]
    gap = base["errors_mean"] - main_table["teacher"]
    if gap > 0:
        assert main_table["recovered"] == pytest.approx(
            (base["errors_mean"] - dist["errors_mean"]) / gap
        )

    # Without class 3 in the transfer set the student (almost) never predicts 3; the fitted bias
    # restores it.
    omitted = figs["omitted-class"]["figures"]
    assert omitted["before_class"] >= 0.9 * omitted["class_n"]
    assert omitted["fitted_class"] < omitted["before_class"]
    run = json.loads((out / "runs/omitted-class/without-3/metrics.json").read_text())
    assert run["metrics"]["test"]["errors"] == omitted["fitted"]
    assert run["config"]["fit_bias_on"].endswith(":train:holdout=0.1:part=holdout:seed=0")
    assert (
        ":holdout=0.1:part=rest:exclude=3" in run["cache"]["dataset"]
    )  # disjoint from the bias's rows

    sweep = json.loads((out / "runs/temperature-sweep/results.json").read_text())
    assert len(sweep) == 6 and all(
        r["status"] == "ok" for r in sweep
    )  # 2 students x 3 temperatures
    rows = {r["model"]: r for r in figs["small-data"]["figures"]["rows"]}
    hard = json.loads((out / "runs/small-data/hard/metrics.json").read_text())
    assert rows["hard targets"]["test_accuracy"] == hard["metrics"]["test"]["accuracy"]
    assert hard["cache"]["rows_used"] == 60  # 10 % of 600 rows at the quick scale


def test_rerun_reuses_every_artefact(reproduced: tuple[Path, Path, str]) -> None:
    data, out, _ = reproduced
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/student.pt")}
    kept = out.parent / "reports" / "task.md"
    res = CliRunner().invoke(
        main,
        [
            "reproduce",
            "main-table,small-data",
            "--dataset",
            f"npz:{data}",
            "--scale",
            "quick",
            "--kept-classes",
            "0,1",
            "--student",
            "mlp:32",
            "--narrow-student",
            "mlp:4",
            "--main-student",
            "mlp:32",
            "--seeds",
            "0,1",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--report",
            str(kept),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "reusing the teacher" in res.output and "training " not in res.output
    report = (out / "report.md").read_text()
    n = 2 * (2 + bool(MAIN_RECIPE.views)) + 3  # main-table's arms x 2 seeds, small-data's 3
    assert f"The {n} student runs" in report
    assert f"({n} of them re-used from an earlier invocation)" in report
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/**/student.pt")} == before
    # The kept copy of the report has its plots beside it, linked by their new names.
    text = kept.read_text()
    for name in ("main-table", "small-data"):
        assert (
            f"![{name}](task-{name}.png)" in text and (kept.parent / f"task-{name}.png").is_file()
        )


def test_bad_requests_are_refused_with_every_problem(tmp_path: Path, npz_path: Path) -> None:
    res = CliRunner().invoke(
        main,
        [
            "reproduce",
            "omitted-class,nope",
            "--dataset",
            "fashion-mnist:train",
            "--omitted-class",
            "7",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 2
    assert "unknown experiment 'nope'" in res.output
    assert "names a source without its split" in res.output
    assert "--omitted-class 7 is also in --kept-classes [7, 8]" in res.output
    res = CliRunner().invoke(
        main, ["reproduce", "--dataset", f"npz:{npz_path}", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "has classes 0..4" in res.output
    # A student spec that cannot be built is refused before the teacher is trained.
    res = CliRunner().invoke(
        main,
        [
            "reproduce",
            "main-table",
            "--dataset",
            f"npz:{npz_path}",
            "--student",
            "mlp:abc",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "hidden widths must be positive integers" in res.output
    assert not (tmp_path / "o" / "teacher").exists()


def test_experiments_without_omitted_class_ignore_its_class_options(
    reproduced: tuple[Path, Path, str],
) -> None:
    """The defaults --omitted-class 3 --kept-classes 7,8 do not fit 5 classes; main-table never
    reads them, so it runs (in a directory of its own)."""
    data, out, _ = reproduced
    res = CliRunner().invoke(
        main,
        [
            "reproduce",
            "main-table",
            "--dataset",
            f"npz:{data}",
            "--scale",
            "quick",
            "--student",
            "mlp:32",
            "--device",
            "cpu",
            "--out",
            str(out.parent / "main-only"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "main-table: " in res.output


def test_report_counts_each_run_once_and_reuse_only_across_invocations(
    reproduced: tuple[Path, Path, str],
) -> None:
    """Every run is counted once, and none is "re-used from an earlier invocation" on the first
    one."""
    _, out, _ = reproduced
    report = (out.parent / "first-report.md").read_text()
    # main-table's arms x 2 seeds + 6 sweep + 2 omitted + 3 small-data
    assert f"The {2 * (2 + bool(MAIN_RECIPE.views)) + 11} student runs" in report
    assert "(0 of them re-used from an earlier invocation)" in report


def test_omitted_class_verdict_needs_more_than_noise() -> None:
    from pipeline.experiments.reproduce.omitted_class import count_noise, omitted_verdict

    holds, verdict = omitted_verdict(3, 2, 1, 0.5, 0.2)
    assert not holds
    assert verdict == (
        "inconclusive: class 3 goes from 2 to 1 errors with a fitted bias; "
        "two-class transfer 50.0 % -> 20.0 %, a change within the noise of so few "
        "errors (±3); run --scale full"
    )
    holds, verdict = omitted_verdict(3, 191, 95, 0.557, 0.341)
    assert holds and verdict.startswith("holds: class 3 goes from 191 to 95 errors")
    holds, verdict = omitted_verdict(3, 5, 9, 0.5, 0.2)
    assert not holds and verdict.startswith("does not hold here: class 3 goes from 5 to 9")
    assert count_noise(0, 0) == 1.0 and count_noise(191, 95) == pytest.approx(33.8, abs=0.1)
