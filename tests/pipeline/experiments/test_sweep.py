"""Sweeps on a real dask LocalCluster (worker processes) over a real cache: rows equal one-by-one
train-student runs, resuming trains only what is missing, and a failing setting does not stop the
others."""

from __future__ import annotations

import csv
import dataclasses
import json
import textwrap
import types
import typing
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.experiments.config import SWEEP_OWNED, SweepConfig
from pipeline.experiments.sweep import (
    RESULT_FIELDS,
    Setting,
    grid,
    markdown_table,
    plan_text,
    run_sweep,
    setting_config,
)
from pipeline.options import declared
from pipeline.training.config import StudentConfig
from pipeline.training.distill import train_student
from pipeline.training.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sweep_config(
    cache: Path, out: Path, train: TrainConfig | None = None, **kw: object
) -> SweepConfig:
    """A small grid over ``cache`` on the CPU; ``train`` replaces the base's training settings."""
    base = StudentConfig(
        cache=str(cache), device="cpu", train=train or TrainConfig(epochs=2, batch_size=64)
    )
    grid = dict(
        base=base,
        temperatures=[2.0, 8.0],
        alphas=[0.5, 1.0],
        students=["mlp:16"],
        seeds=[0],
        out=str(out),
        torch_threads=1,
    )
    return SweepConfig(**{**grid, **kw})


def test_grid_is_the_cross_product_in_a_stable_order(tmp_path: Path) -> None:
    cfg = SweepConfig(
        base=StudentConfig(cache="c"),
        temperatures=[1, 4],
        alphas=[0.9],
        students=["mlp:8", "mlp:30,30"],
        seeds=[0, 1],
        out=str(tmp_path),
    )
    names = [s.name for s in grid(cfg)]
    assert names == [
        "mlp-8-T1-a0.9-s0",
        "mlp-8-T1-a0.9-s1",
        "mlp-8-T4-a0.9-s0",
        "mlp-8-T4-a0.9-s1",
        "mlp-30-30-T1-a0.9-s0",
        "mlp-30-30-T1-a0.9-s1",
        "mlp-30-30-T4-a0.9-s0",
        "mlp-30-30-T4-a0.9-s1",
    ]
    scfg = setting_config(cfg, Setting("mlp:30,30", 4.0, 0.9, 1))
    assert (scfg.student, scfg.temperature, scfg.alpha, scfg.train.seed) == (
        "mlp:30,30",
        4.0,
        0.9,
        1,
    )
    assert scfg.out == str(tmp_path / "runs" / "mlp-30-30-T4-a0.9-s1")


def test_every_config_problem_is_reported_at_once() -> None:
    cfg = SweepConfig(
        base=StudentConfig(cache="c", loss="nope"),
        temperatures=[0, 2, 2],
        alphas=[1.5],
        students=[],
        seeds=[],
        workers=-1,
        out="",
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    text = str(e.value)
    for part in (
        "temperatures has repeated values",
        "temperature must be > 0, got 0",
        "alpha must be in [0, 1], got 1.5",
        "students must have at least one value",
        "seeds must have at least one value",
        "workers must be >= 0",
        "unknown loss 'nope'; expected one of",
        "--out SWEEP_DIR must be given",
    ):
        assert part in text


def test_settings_that_would_share_a_run_directory_are_refused() -> None:
    cfg = SweepConfig(
        base=StudentConfig(cache="c"),
        students=["torchscript:a/b.pt", "torchscript:a_b.pt"],
        temperatures=[4],
        alphas=[0.9],
        out="x",
    )
    with pytest.raises(
        ConfigError, match="would share the run directory torchscript-a_b.pt-T4-a0.9-s0"
    ):
        cfg.validate()


def test_localcluster_rows_equal_one_by_one_runs_and_resume_reuses(
    cache_path: Path, tmp_path: Path
) -> None:
    cfg = sweep_config(cache_path, tmp_path / "sweep", workers=2)
    res = run_sweep(cfg, log=lambda s: None, progress=False)
    assert (res.trained, res.reused, res.failed, res.interrupted) == (4, 0, 0, False)
    assert [r["setting"] for r in res.rows] == [s.name for s in grid(cfg)]

    # The same settings one by one, in this process, through train-student's code path.
    for row, setting in zip(res.rows, grid(cfg), strict=True):
        scfg = setting_config(cfg, setting)
        scfg.out = str(tmp_path / "single" / setting.name)
        single = train_student(scfg, log=lambda s: None, progress=False)["metrics"]
        assert row["test_errors"] == single["test"]["errors"]
        assert row["test_nll"] == single["test"]["nll"]
        assert row["test_ece"] == single["test"]["ece"]
        assert row["teacher_agreement"] == single["teacher_agreement_transfer"]

    with open(tmp_path / "sweep" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == [r["setting"] for r in res.rows]
    assert list(table[0]) == RESULT_FIELDS
    assert json.loads((tmp_path / "sweep" / "results.json").read_text()) == res.rows
    assert (tmp_path / "sweep" / "test_error_vs_temperature.png").read_bytes()[
        :8
    ] == b"\x89PNG\r\n\x1a\n"
    best = min(r["test_errors"] for r in res.rows)
    assert f"**{best}**" in (tmp_path / "sweep" / "results.md").read_text()

    # Re-running reads every finished setting back; one whose config changed (more epochs) is not
    # "finished".
    again = run_sweep(
        sweep_config(cache_path, tmp_path / "sweep", workers=0), log=lambda s: None, progress=False
    )
    assert (again.trained, again.reused) == (0, 4)
    assert again.rows == res.rows
    # A run recorded before an option existed (here storage_options) is the same run: the option's
    # default applies.
    metrics = tmp_path / "sweep" / "runs" / grid(cfg)[0].name / "metrics.json"
    old = json.loads(metrics.read_text())
    del old["config"]["storage_options"]
    metrics.write_text(json.dumps(old))
    assert "4 done, 0 to run" in plan_text(cfg)[1]
    longer = sweep_config(
        cache_path,
        tmp_path / "sweep",
        workers=0,
        temperatures=[2.0],
        train=TrainConfig(epochs=3, batch_size=64),
    )
    _, plan = plan_text(longer)
    assert "0 done, 2 to run" in plan
    lines: list[str] = []
    replaced = run_sweep(longer, log=lines.append, progress=False)
    assert (replaced.trained, replaced.reused) == (2, 0)
    assert (
        "mlp-16-T2-a0.5-s0: its run directory holds a run with another config or cache; "
        "it will be replaced" in lines
    )
    assert (
        json.loads((tmp_path / "sweep/runs/mlp-16-T2-a0.5-s0/metrics.json").read_text())["metrics"][
            "epochs"
        ]
        == 3
    )


def test_a_failing_setting_is_recorded_and_the_others_finish(
    cache_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's own student factory that raises: a runtime failure validation cannot see.
    (tmp_path / "broken_student.py").write_text(
        textwrap.dedent("""
        def make(in_shape, num_classes):
            raise RuntimeError("planted failure in the student factory")
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = sweep_config(
        cache_path,
        tmp_path / "sweep",
        workers=0,
        temperatures=[4.0],
        alphas=[0.9],
        students=["py:broken_student:make", "mlp:16"],
    )
    res = run_sweep(cfg, log=lambda s: None, progress=False)
    assert (res.trained, res.failed) == (1, 1)
    failed, ok = res.rows
    assert (
        failed["status"] == "failed" and "planted failure in the student factory" in failed["error"]
    )
    assert "RuntimeError" in (Path(failed["run_dir"]) / "error.txt").read_text()
    assert ok["status"] == "ok" and ok["test_errors"] is not None
    # The student's own error, as one message naming the spec (no bare RuntimeError).
    table = markdown_table(res.rows, cfg)
    assert "failed: model spec 'py:broken_student:make': the factory broken_student.make(" in table
    # A failed setting is retried on the next run; the finished one is not.
    again = run_sweep(cfg, log=lambda s: None, progress=False)
    assert (again.trained, again.reused, again.failed) == (0, 1, 1)


def test_dry_run_lists_the_grid_and_its_cost(cache_path: Path, tmp_path: Path) -> None:
    cfg = sweep_config(cache_path, tmp_path / "sweep", seeds=[0, 1], train=TrainConfig(epochs=3))
    settings, text = plan_text(cfg)
    assert len(settings) == 8
    assert "8 settings = 1 students x 2 temperatures x 2 alphas x 2 seeds; 0 done, 8 to run" in text
    assert (
        "8 settings x 3 epochs = 24 student-epochs over 600 cached rows each (14,400 row passes)"
        in text
    )
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing


def other_value(annotation: object, default: object, choices: list[str] | None) -> object:
    """A valid-looking value of ``annotation``'s type that differs from ``default``."""
    if choices is not None:
        return next(c for c in choices if c != default)
    if isinstance(annotation, types.UnionType):  # X | None: the X
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = typing.get_origin(annotation) or annotation
    inner = typing.get_args(annotation)
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return (default or 0.0) + 0.25
    if kind is str:
        return f"{default or 'given'}-changed"
    if kind is list:
        return [3] if inner == (int,) else ["changed-a", "changed-b"]
    if kind is dict:
        return {3: 1.5} if inner == (int, float) else {"region": "changed"}
    raise AssertionError(f"no test value for {annotation}")


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """Every field of ``cls`` and of its nested configs: (dotted path, field, annotation)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, hints[f.name]))
    return out


def with_value(config: object, path: str, value: object) -> object:
    head, _, rest = path.partition(".")
    if rest:
        value = with_value(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})


def value_at(config: object, path: str) -> object:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def test_every_student_option_reaches_every_setting(tmp_path: Path) -> None:
    """Each field of StudentConfig (and its TrainConfig) given to the sweep's base with a
    non-default value is in every setting's config; the axes' fields take the setting's value."""
    default = StudentConfig()
    fields = leaf_fields(StudentConfig)
    assert {"allow_partial", "class_bias", "fit_bias_on", "loader_workers", "val"} <= {
        p for p, _, _ in fields
    }
    assert "train.epochs" in {p for p, _, _ in fields}
    base, given = default, {}
    for path, f, annotation in fields:
        if path in SWEEP_OWNED:
            continue
        opt = declared(f)
        value = other_value(annotation, value_at(default, path), opt and opt.choice_names())
        assert value != value_at(default, path), path
        base, given[path] = with_value(base, path, value), value
    cfg = SweepConfig(
        base=base,
        temperatures=[3.0, 5.0],
        alphas=[0.25],
        students=["mlp:7", "mlp:9"],
        seeds=[4, 6],
        out=str(tmp_path / "sweep"),
    )
    assert cfg.owned_problems() == []
    settings = grid(cfg)
    assert len(settings) == 8
    for s in settings:
        scfg = setting_config(cfg, s)
        per_setting = {
            "student": s.student,
            "temperature": s.temperature,
            "alpha": s.alpha,
            "train.seed": s.seed,
            "out": str(tmp_path / "sweep" / "runs" / s.name),
            "overwrite": True,
        }
        assert set(per_setting) == set(SWEEP_OWNED)
        for path, _, _ in fields:
            want = per_setting[path] if path in per_setting else given[path]
            assert value_at(scfg, path) == want, (s.name, path)


def test_values_the_settings_replace_are_refused_in_the_base() -> None:
    cfg = SweepConfig(
        base=StudentConfig(
            cache="c", temperature=4.0, student="mlp:8", out="elsewhere", train=TrainConfig(seed=3)
        ),
        out="o",
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    text = str(e.value)
    for part in (
        "base.temperature = 4.0 would be ignored: each setting's comes from temperatures",
        "base.student = 'mlp:8' would be ignored: each setting's comes from students",
        "base.train.seed = 3 would be ignored: each setting's comes from seeds",
        "base.out = 'elsewhere' would be ignored: each setting's run directory is "
        "OUT/runs/<setting>",
    ):
        assert part in text
    assert "alpha" not in text  # left at its default: nothing to refuse
