"""``kd-pipeline demo``: the main job on the shipped Fashion-MNIST, through the public stages only.

Teacher ensemble on all 60,000 training images -> logit cache over a small transfer set (5 % of them
by default) -> a baseline student on that set's hard labels and distilled students at a few
temperatures from the cache -> one table. It tells the paper's small-data story in minutes on a CPU:
through the same 3,000 images, the teacher's soft targets carry much more than the labels do.
Re-running reuses every artefact whose recorded config matches (the teacher is not retrained, the
cache not recomputed, finished students not retrained).

The teacher is lightly regularised (dropout 0.2, no jitter) so that 3 epochs on 2 CPU cores make it
clearly better than the students; the paper's heavier recipe needs many more epochs (see the
README's results).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.cache.config import CacheConfig
from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from pipeline.checks import collect, in_range, temperature
from pipeline.datasets import FASHION_MNIST_CLASSES
from pipeline.devices import resolve_device
from pipeline.errors import ConfigError, KDError
from pipeline.evaluation import EvaluateConfig, evaluate_models
from pipeline.experiments.plots import bar_chart, optional_plot
from pipeline.experiments.sweep import finished_result
from pipeline.metrics import percent
from pipeline.models import build_model
from pipeline.options import field_problems, option, parse_floats, show_list
from pipeline.step_options import device_option, output_dir
from pipeline.training.config import StudentConfig, TeacherConfig
from pipeline.training.distill import train_student
from pipeline.training.teacher import recorded_config, train_teacher
from pipeline.training.train_config import TrainConfig

FASHION_MNIST_SHAPE = (1, 28, 28)


@dataclass
class DemoConfig:
    """``demo``: teacher ensemble, cache, baseline and distilled students on Fashion-MNIST."""

    out: str = option("", help="Where the demo writes [default: data/demo].")
    epochs: int = option(3, help="Teacher epochs.")
    members: int = option(2, help="Teacher ensemble size.")
    model: str = option("mlp:1200,1200", help="Teacher model spec.")
    input_dropout: float | None = 0.0
    dropout: float | None = 0.2
    jitter: int = 0
    student: str = option("mlp:800,800", help="Student model spec.")
    student_epochs: int = option(20, help="Epochs of each student.")
    temperatures: list[float] = option(
        default_factory=lambda: [4.0, 20.0],
        parse=parse_floats,
        show=show_list,
        help="Comma-separated temperatures to distil at.",
    )
    alpha: float = option(0.9, help="Soft-term weight of distilled students.")
    transfer_fraction: float | None = option(
        0.05,
        parse=lambda v: float(v) or None,
        help="Fraction of the training images in the transfer set the students learn from "
        "(1 = all).",
    )
    train_subset: float | None = option(
        None,
        help="Fraction of fashion-mnist:train for the "
        "teacher and, as is, for the students (a quick run).",
    )
    device: str = device_option()
    seed: int = option(0, least=0, help="Seed for weight initialisation, dropout and shuffling.")

    def resolve(self) -> DemoConfig:
        return self if self.out else replace(self, out=output_dir("demo", ""))

    def specs(self) -> tuple[str, str]:
        """The teacher's training set and the students' transfer set."""
        train = "fashion-mnist:train" + (
            f":fraction={self.train_subset}:seed={self.seed}" if self.train_subset else ""
        )
        transfer = train + (
            f":fraction={self.transfer_fraction}:seed={self.seed}"
            if self.transfer_fraction and not self.train_subset
            else ""
        )
        return train, transfer

    def teacher_config(self) -> TeacherConfig:
        """The ``train-teacher`` run the demo makes (or reuses) under ``OUT/teacher``."""
        return TeacherConfig(
            dataset=self.specs()[0],
            model=self.model,
            input_dropout=self.input_dropout,
            dropout=self.dropout,
            jitter=self.jitter,
            members=self.members,
            out=str(Path(self.out) / "teacher"),
            device=self.device,
            train=TrainConfig(epochs=self.epochs, seed=self.seed),
        )

    def student_config(
        self, cache: str, out: str, temperature: float, alpha: float
    ) -> StudentConfig:
        """One of the demo's ``train-student`` runs (the demo owns its run directories)."""
        return StudentConfig(
            cache=cache,
            student=self.student,
            temperature=temperature,
            alpha=alpha,
            eval="fashion-mnist:test",
            out=out,
            device=self.device,
            overwrite=True,
            train=TrainConfig(epochs=self.student_epochs, seed=self.seed),
        )

    def validate(self) -> None:
        """Every problem of the demo and of each step it runs, before the first one starts.

        Raises:
            ConfigError: all problems at once (the steps' own checks included).
        """
        problems = field_problems(self) + collect(
            None if self.temperatures else "temperatures must have at least one value",
            *(temperature("temperature", t) for t in self.temperatures),
            in_range("alpha", self.alpha, 0, 1),
            None if self.out else "--out DIR must be given",
        )
        for name in ("transfer_fraction", "train_subset"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                problems.append(f"{name} must be in (0, 1], got {value}")
        steps = [
            self.teacher_config(),
            *(
                self.student_config("probe", "probe", t, self.alpha)
                for t in self.temperatures
                if t > 0
            ),
        ]
        for step in steps:
            try:
                step.validate()
            except ConfigError as e:
                problems += [q for q in e.problems if q not in problems]
        # The model specs too (a few ms): a typo must not cost a trained teacher.
        for spec in (self.teacher_config().model_spec(), self.student):
            try:
                build_model(spec, FASHION_MNIST_SHAPE, len(FASHION_MNIST_CLASSES))
            except KDError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError(problems)


def _student(
    cfg: DemoConfig,
    cache: Path,
    out: Path,
    temperature: float,
    alpha: float,
    log: Callable[[str], None],
) -> dict:
    scfg = cfg.student_config(str(cache), str(out), temperature, alpha)
    previous = finished_result(scfg, {"cache": cache_fingerprint(LogitCache(cache).header)})
    if previous is not None:
        log(f"reusing {out}")
        return previous
    return train_student(scfg, log=log, progress=False)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole story; returns (and writes to ``demo.json``) the table's numbers."""
    cfg.validate()
    resolve_device(cfg.device)  # an unavailable device fails now, not after the teacher
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_spec, transfer_spec = cfg.specs()
    tcfg = cfg.teacher_config()
    teacher_dir = Path(tcfg.out)
    recorded = recorded_config(teacher_dir)
    if recorded is not None and recorded.recipe() == tcfg.recipe():
        log(f"reusing the teacher in {teacher_dir}")
    else:
        # A new teacher makes the old cache and students stale: remove them rather than mix
        # generations.
        for stale in (out / "cache.zarr", out / "runs", teacher_dir):
            shutil.rmtree(stale, ignore_errors=True)
        train_teacher(tcfg, log=log)
    teacher = evaluate_models(
        EvaluateConfig(model=str(teacher_dir), dataset="fashion-mnist:test", device=cfg.device)
    )
    cache = out / "cache.zarr"
    cres = build_cache(
        CacheConfig(
            teachers=[str(teacher_dir)],
            dataset=transfer_spec,
            out=str(cache),
            device=cfg.device,
            command="kd-pipeline demo",
        ),
        log=log,
        progress=False,
    )
    log(cres.message)
    runs = {
        "baseline (hard labels)": _student(cfg, cache, out / "runs" / "baseline", 1.0, 0.0, log)
    }
    for t in cfg.temperatures:
        runs[f"distilled T={t:g} alpha={cfg.alpha:g}"] = _student(
            cfg, cache, out / "runs" / f"T{t:g}", t, cfg.alpha, log
        )
    rows = [(f"teacher member {i}", m) for i, m in enumerate(teacher["members"])]
    rows.append((f"teacher ensemble ({len(teacher['members'])})", teacher["ensemble"]))
    rows += [(f"student {name}", r["metrics"]["test"]) for name, r in runs.items()]
    log(
        f"\nstudents trained on {transfer_spec} "
        f"({runs[next(iter(runs))]['cache']['rows_used']} images); the teacher on {train_spec}"
    )
    table = [
        {"model": name, "errors": m["errors"], "accuracy": m["accuracy"], "ece": m["ece"]}
        for name, m in rows
    ]
    summary = {
        "config": asdict(cfg),
        "table": table,
        "teacher": str(teacher_dir),
        "cache": str(cache),
        "runs": {name: r["config"]["out"] for name, r in runs.items()},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    plot = optional_plot(
        lambda: bar_chart(
            out / "demo.png",
            [r["model"] for r in table],
            [r["errors"] for r in table],
            "test errors (fashion-mnist:test)",
        ),
        log,
    )
    (out / "report.md").write_text(_report(cfg, table, train_spec, transfer_spec, runs))
    log("")
    log(
        f"{'model (fashion-mnist:test, 10000 images)':<44} {'errors':>7} {'accuracy':>9} {'ECE':>7}"
    )
    for r in table:
        log(f"{r['model']:<44} {r['errors']:>7} {percent(r['accuracy']):>9} {r['ece']:>7.3f}")
    log(
        f"\nteacher: {teacher_dir}\ncache:   {cache}  (kd-pipeline cache info {cache})"
        f"\nruns:    {out / 'runs'}"
        f"\nreport:  {out / 'report.md'} (plot {plot})\nsummary: {out / 'demo.json'}"
    )
    return summary


def _report(
    cfg: DemoConfig, table: list[dict], train_spec: str, transfer_spec: str, runs: dict
) -> str:
    """The demo's table as Markdown, with what each row was trained on."""
    rows = [
        f"| {r['model']} | {r['errors']} | {percent(r['accuracy'])} | {r['ece']:.3f} |"
        for r in table
    ]
    return "\n".join(
        [
            "# kd-pipeline demo",
            "",
            f"Teacher: {cfg.members} x `{cfg.model}`, {cfg.epochs} epochs on `{train_spec}`. "
            f"Students: `{cfg.student}`, {cfg.student_epochs} epochs on the transfer set "
            f"`{transfer_spec}` (the baseline on its hard labels, the distilled ones on the "
            f"teacher's cached logits at each T with alpha = {cfg.alpha:g}).",
            "",
            "| model (fashion-mnist:test) | errors | accuracy | ECE |",
            "|---|---|---|---|",
            *rows,
            "",
            "![test errors](demo.png)",
            "",
            "Run directories: " + ", ".join(f"`{r['config']['out']}`" for r in runs.values()),
            "",
        ]
    )
