"""``kd-pipeline reproduce``: the paper's experiments as recipes over the public stages, reported.

Each experiment calls the same steps a user would call — ``train-teacher``, ``evaluate``,
``cache-logits``, ``train-student``, ``sweep`` — through one shared set of artefacts, measures,
and returns a plain record; the report is rendered from the records afterwards. Nothing here
trains by itself, and artefacts are reused when their recorded config matches, so re-running
after an interruption continues where it stopped::

    OUT/
      teacher/                 the teacher ensemble (unless --teacher names an existing one)
      caches/<transfer>.zarr   one cache per transfer set
      runs/<experiment>/...    train-student run directories; sweeps/ for the temperature sweep
      report.md, *.png         the report with the paper's numbers next to ours
      reproduce.json           every figure in the report

Modules:

- ``recipes``: :class:`ReproduceConfig`, the scales, teacher recipes and the paper's figures (data).
- ``artefacts``: :class:`~.artefacts.Run`, the shared teacher, caches and student runs.
- ``sections``: what an experiment's record is (:class:`~.sections.Section`); the experiments
  (:data:`EXPERIMENTS`), each measured into a record with a verdict: ``main_table``,
  ``temperature``, ``omitted_class``, ``small_data``, ``consistency``.
- ``report``: the records as Markdown (:func:`~.report.render_report`) and charts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.devices import resolve_device
from pipeline.experiments.plots import optional_plot
from pipeline.experiments.reproduce.artefacts import Run
from pipeline.experiments.reproduce.consistency import consistency
from pipeline.experiments.reproduce.main_table import main_table
from pipeline.experiments.reproduce.omitted_class import omitted_class
from pipeline.experiments.reproduce.recipes import (
    EXPERIMENT_NAMES,
    HOLDOUT,
    PAPER,
    QUICK_TEACHER,
    SCALES,
    TEACHERS,
    ReproduceConfig,
    Scale,
    TeacherRecipe,
)
from pipeline.experiments.reproduce.report import Header, draw_plot, render_report
from pipeline.experiments.reproduce.sections import Section
from pipeline.experiments.reproduce.small_data import small_data
from pipeline.experiments.reproduce.temperature import temperature
from pipeline.training.teacher import recorded_config

__all__ = [
    "EXPERIMENTS",
    "EXPERIMENT_NAMES",
    "HOLDOUT",
    "PAPER",
    "QUICK_TEACHER",
    "SCALES",
    "TEACHERS",
    "Header",
    "ReproduceConfig",
    "Run",
    "Scale",
    "Section",
    "TeacherRecipe",
    "draw_plot",
    "render_report",
    "run_reproduce",
]

#: The experiments by name, in the report's order.
EXPERIMENTS: dict[str, Callable[[Run], Section]] = {
    "main-table": main_table,
    "temperature": temperature,
    "omitted-class": omitted_class,
    "small-data": small_data,
    "consistency": consistency,
}


def run_reproduce(cfg: ReproduceConfig, log: Callable[[str], None] = print) -> dict:
    """Run the chosen experiments; write ``report.md`` and ``reproduce.json``; return the summary.

    The recipe: set up the shared artefacts (:class:`Run`); measure each experiment into its record
    and draw its chart; then write the summary and render the report (and its kept copy,
    ``cfg.report``, with the charts beside it).
    """
    cfg.validate()
    t0 = time.perf_counter()
    run = Run(cfg, log)
    run.out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    for name in cfg.experiments():
        log(f"== {name}")
        t = time.perf_counter()
        sec = EXPERIMENTS[name](run)
        sec.plot = optional_plot(lambda sec=sec: draw_plot(sec, run.out), log)
        sec.seconds = time.perf_counter() - t
        sections.append(sec)
    summary = {
        "config": asdict(cfg),
        "scale": asdict(run.scale),
        "teacher": run.teacher(),
        "teacher_recipe": asdict(run.recipe) if not cfg.teacher else None,
        "teacher_test": run.teacher_metrics["ensemble"],
        "seconds": time.perf_counter() - t0,
        "experiments": {sec.name: sec.to_json() for sec in sections},
    }
    (run.out / "reproduce.json").write_text(json.dumps(summary, indent=2, default=str))
    header = Header(
        cfg=cfg,
        recipe=run.recipe,
        given_teacher=recorded_config(cfg.teacher) if cfg.teacher else None,
        test_spec=run.test_spec,
        teacher_errors=summary["teacher_test"]["errors"],
        student_runs=list(run.runs.values()),
        seconds=summary["seconds"],
        date=time.strftime("%Y-%m-%d"),
        device_type=resolve_device(cfg.device).type,
        threads=torch.get_num_threads(),
    )
    (run.out / "report.md").write_text(render_report(header, sections))
    log(f"\nwrote {run.out / 'report.md'} and {run.out / 'reproduce.json'}")
    if cfg.report:
        # A copy to keep (e.g. committed under data/reports): plots beside it, named after it.
        target = Path(cfg.report)
        target.parent.mkdir(parents=True, exist_ok=True)
        for sec in sections:
            if sec.plot:
                shutil.copyfile(sec.plot, target.parent / f"{target.stem}-{Path(sec.plot).name}")
        target.write_text(render_report(header, sections, plot_prefix=f"{target.stem}-"))
        log(f"wrote {target}")
    for sec in sections:
        log(f"{sec.name}: {sec.verdict}")
    return summary
