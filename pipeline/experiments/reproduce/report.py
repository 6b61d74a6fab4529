"""Rendering: reproduce's records (``sections``) as Markdown beside the paper's numbers, and charts.

Pure functions of the records and the :class:`Header`, apart from :func:`draw_plot`, which writes
each section's PNG. The same records always render to the same text.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.experiments.plots import bar_chart, line_chart
from pipeline.experiments.reproduce.consistency import Consistency
from pipeline.experiments.reproduce.main_table import MainTable
from pipeline.experiments.reproduce.omitted_class import OmittedClass
from pipeline.experiments.reproduce.recipes import PAPER, ReproduceConfig, TeacherRecipe
from pipeline.experiments.reproduce.sections import Section, pct
from pipeline.experiments.reproduce.small_data import SmallData
from pipeline.experiments.reproduce.temperature import Temperature
from pipeline.training.config import TeacherConfig


@dataclass
class Header:
    """What the report says about the invocation as a whole.

    Attributes:
        cfg: the resolved config.
        recipe: the teacher recipe (used unless ``cfg.teacher`` names a teacher).
        given_teacher: how a ``--teacher`` ensemble was trained (its recorded config), if known.
        test_spec: the test set of every figure; teacher_errors: the teacher's errors on it.
        student_runs: per student run: (its wall seconds when it ran, whether this invocation
            reused it).
        seconds: this invocation's wall time.
        date, device_type, threads: when and on what the report was written.
    """

    cfg: ReproduceConfig
    recipe: TeacherRecipe
    given_teacher: TeacherConfig | None
    test_spec: str
    teacher_errors: int
    student_runs: list[tuple[float, bool]]
    seconds: float
    date: str
    device_type: str
    threads: int


def render_report(header: Header, sections: list[Section], plot_prefix: str = "") -> str:
    """The whole report: the invocation, a verdict table, then one section per experiment.

    Args:
        plot_prefix: prepended to each plot's file name in its link (a kept copy of the report names
            its plots after itself).
    """
    cfg, runs = header.cfg, header.student_runs
    if cfg.teacher:
        teacher = f"`{cfg.teacher}` (given with --teacher{_given_teacher(header.given_teacher)})"
    else:
        r = header.recipe
        teacher = f"{r.members} x `{r.model}`, {r.epochs} epochs, jitter {r.jitter} ({r.why})"
    command = (
        f"kd-pipeline reproduce {cfg.experiment} --dataset {cfg.dataset} "
        f"--scale {cfg.scale} --out {cfg.out}"
        + (f" --teacher {cfg.teacher}" if cfg.teacher else "")
    )
    lines = [
        f"# kd-pipeline reproduce: {cfg.dataset}, scale {cfg.scale}",
        "",
        f"Command: `{command}`. Written {header.date}; device {header.device_type}, "
        f"{header.threads} torch threads. The {len(runs)} student runs behind these figures "
        f"took {sum(t for t, _ in runs) / 60:.1f} min of wall time when they ran "
        f"({sum(u for _, u in runs)} of them re-used from an earlier invocation); this "
        f"invocation took {header.seconds / 60:.1f} min.",
        "",
        f"Teacher: {teacher}: {header.teacher_errors} test errors on `{header.test_spec}`.",
        "",
        "| experiment | the paper | verdict here |",
        "|---|---|---|",
    ]
    for sec in sections:
        lines.append(f"| {sec.name} | {PAPER[sec.name]} | {sec.verdict} |")
    for sec in sections:
        lines += [
            "",
            f"## {sec.name}",
            "",
            f"Paper: {PAPER[sec.name]}.",
            "",
            render_section(sec),
            "",
        ]
        if sec.plot:
            lines.append(f"![{sec.name}]({plot_prefix}{Path(sec.plot).name})")
        lines.append(f"\n(this invocation: {sec.seconds:.0f} s)")
    return "\n".join(lines) + "\n"


def _given_teacher(c: TeacherConfig | None) -> str:
    """How a given teacher ensemble was trained (empty when its ensemble.json says nothing)."""
    if c is None:
        return ""
    return (
        f"; trained by train-teacher: {c.members} x `{c.model}`, {c.train.epochs} epochs, "
        f"jitter {c.jitter}, on `{c.dataset}`, device {c.device}"
    )


def render_section(sec: Section) -> str:
    """One experiment's section body (tables and findings) as Markdown."""
    return _RENDERERS[type(sec)](sec)


def draw_plot(sec: Section, out: Path) -> Path | None:
    """Write the section's chart under ``out`` (``<name>.png``); returns its path (None: none)."""
    return _PLOTTERS[type(sec)](sec, out)


def metrics_table(
    rows: list[tuple[str, dict]], extra: tuple[str, Callable[[dict], str]] | None = None
) -> str:
    """One row per (label, metrics): test errors, accuracy, NLL, ECE, and an optional column."""
    head = "| model | test errors | accuracy | NLL | ECE |" + (f" {extra[0]} |" if extra else "")
    lines = [head, "|---" * (5 + bool(extra)) + "|"]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['errors']} | {pct(m['accuracy'])} | {m['nll']:.3f} | "
            f"{m['ece']:.3f} |" + (f" {extra[1](m)} |" if extra else "")
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main table
def render_main_table(sec: MainTable) -> str:
    r, t = sec.recipe, sec.teacher_ensemble
    seeds = ", ".join(map(str, sec.seeds))
    lines = [
        f"Fair protocol: every student is `{sec.student}`, trained {sec.epochs} epochs with the "
        f"same optimiser on `{sec.transfer}` (the training split less a held-out share), seeds "
        f"{seeds}; each run keeps the weights of its own best epoch on the validation split "
        f"`{sec.validation}` (fewest errors, ties by NLL), which neither the teacher nor any "
        "student trained on. The test set chooses nothing.",
        "",
        f"Distilled recipe: T = {r['temperature']:g}, alpha = {r['alpha']:g}"
        + (
            f", trained on a cache of {r['views']} views per image of `{r['augment']}` (the "
            "teacher ran once per view; each epoch the student sees one stored view per image, "
            "replayed exactly, with that view's soft targets)"
            if r["views"]
            else ", from a cache of the unaugmented images"
        )
        + f". Why: {r['why']}.",
        "",
        "| model | test errors | per seed | chosen epochs | NLL | ECE | wall s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, m in enumerate(sec.teacher_members):
        lines.append(
            f"| teacher member {i} | {m['errors']} | | | {m['nll']:.3f} | {m['ece']:.3f} | |"
        )
    lines.append(
        f"| teacher ensemble ({len(sec.teacher_members)}) | {t['errors']} | | | {t['nll']:.3f} | "
        f"{t['ece']:.3f} | |"
    )
    for label, a in sec.arms.items():
        lines.append(
            f"| {label} | {a['errors_mean']:.1f} ± {a['errors_std']:.1f} | "
            f"{', '.join(map(str, a['errors']))} | {', '.join(map(str, a['chosen_epochs']))} | "
            f"{a['nll_mean']:.3f} | {a['ece_mean']:.3f} | {a['wall_mean']:.0f} |"
        )
    lines.append("")
    if sec.gap > 0:
        per_seed = ", ".join(pct(x) for x in sec.recovered_per_seed)
        lines.append(
            f"Distillation recovers **{pct(sec.recovered)}** of the teacher-baseline gap (means "
            f"over seeds: {sec.arms[sec.baseline]['errors_mean']:.1f} -> "
            f"{sec.arms[sec.distilled]['errors_mean']:.1f} errors; teacher {t['errors']}); per "
            f"seed {per_seed}."
        )
        if sec.control:
            views_only = sec.recovered_from(sec.control)
            lines.append(
                f"Hard labels on the same views alone recover {pct(views_only)}; the teacher's "
                f"soft targets on those views recover {pct(sec.recovered - views_only)} more."
            )
    else:
        lines.append(
            f"The baseline student ({sec.arms[sec.baseline]['errors_mean']:.1f} errors) is not "
            f"worse than the teacher ({t['errors']}): there is no gap to recover."
        )
    cost = f"Cost: the unaugmented cache took {sec.cache_seconds['plain']:.0f} s to write"
    if sec.cache_seconds.get("views") is not None:
        cost += (
            f", the view cache {sec.cache_seconds['views']:.0f} s (the teacher's forward passes)"
        )
    lines.append(cost + "; each student's mean wall time is in the table.")
    return "\n".join(lines)


def plot_main_table(sec: MainTable, out: Path) -> Path:
    labels = [f"teacher ({len(sec.teacher_members)})", *sec.arms]
    values = [sec.teacher_ensemble["errors"], *(a["errors_mean"] for a in sec.arms.values())]
    return bar_chart(
        out / "main-table.png",
        [label.split(":")[0] if label.startswith("distilled") else label for label in labels],
        [round(v, 1) for v in values],
        "test errors (mean over seeds)",
    )


# ------------------------------------------------------------------------------------ temperature
def render_temperature(sec: Temperature) -> str:
    text = [
        f"Transfer set `{sec.spec}`; {sec.epochs} epochs per setting; every setting is a run "
        f"directory under `{sec.sweep_dir}/runs`.",
        "",
        sec.sweep_table,
        "",
    ]
    wide_name, narrow_name = sec.students
    wide, narrow = sec.best.get(wide_name), sec.best.get(narrow_name)
    if wide and narrow:
        text.append(
            f"Best temperature: {wide_name} T = {wide['temperature']:g} "
            f"({wide['errors']} errors); {narrow_name} T = {narrow['temperature']:g} "
            f"({narrow['errors']} errors)."
        )
        spreads = ", ".join(f"alpha {a:g}: {v}" for a, v in wide["spread_T_ge_8"].items())
        text.append(f"Spread of the wide student's errors over T >= 8: {spreads}.")
        text.append(
            f"Wide student: {wide['best_T_ge_8']} errors at its best T >= 8 vs "
            f"{wide['errors']} at its best overall "
            f"({'as good' if sec.wide_ok else 'high T is worse'}); narrow student: "
            f"{narrow['best_T_le_4']} errors at its best T <= 4 vs "
            f"{narrow['best_T_ge_8']} at its best T >= 8 "
            f"({'lower T is better' if sec.narrow_ok else 'lower T is not better'})."
        )
    return "\n".join(text)


def plot_temperature(sec: Temperature, out: Path) -> Path | None:
    """The sweep's own chart, copied (an earlier copy stays when this sweep drew none)."""
    plot = out / "temperature.png"
    if sec.sweep_plot:
        shutil.copyfile(sec.sweep_plot, plot)
    return plot if plot.exists() else None


# ---------------------------------------------------------------------------------- omitted class
def render_omitted_class(sec: OmittedClass) -> str:
    c = sec.c
    rows = [
        (f"student without class {c}, no correction", sec.before),
        (f"+ bias {c} by the paper's +3.5", sec.paper_bias),
        (f"+ bias {c} fitted on held-out `{sec.held_spec}` ({sec.fitted_offset:+.1f})", sec.after),
    ]

    def class_errors(m: dict) -> str:
        return f"{m['per_class_errors'][c]} / {m['per_class_n'][c]}"

    table = metrics_table(rows, extra=(f"errors on class {c}", class_errors))
    offsets = ", ".join(f"{k}: {v:+.1f}" for k, v in sec.kept_offsets.items())
    return "\n".join(
        [
            table,
            "",
            f"Only classes {sec.kept} in the transfer set: test error "
            f"{pct(1 - sec.kept_before['accuracy'])} before, {pct(1 - sec.kept_after['accuracy'])} "
            f"after fitting the absent classes' biases on held-out data (offsets {offsets}).",
        ]
    )


def plot_omitted_class(sec: OmittedClass, out: Path) -> Path:
    c = sec.c
    return bar_chart(
        out / "omitted-class.png",
        ["no correction", "+3.5", "fitted"],
        [m["per_class_errors"][c] for m in (sec.before, sec.paper_bias, sec.after)],
        f"test errors on class {c}",
    )


# ------------------------------------------------------------------------------------- small data
def render_small_data(sec: SmallData) -> str:
    lines = [
        f"Transfer set `{sec.spec}` ({sec.rows_used} rows), {sec.epochs} epochs. Reference "
        f"row: hard targets on `{sec.full_spec}` ({sec.full_rows} rows), the set the recipe's "
        "teacher is trained on.",
        "",
        "| student | train accuracy | test accuracy (last epoch) | best epoch's test accuracy "
        "(epoch) | early stopping needed |",
        "|---|---|---|---|---|",
    ]
    for r in sec.rows:
        lines.append(
            f"| {r['model']} | {pct(r['train_accuracy'])} | {pct(r['test_accuracy'])} | "
            f"{pct(r['best_epoch_test_accuracy'])} ({r['best_epoch']}) | "
            f"{'yes' if r['early_stopping_needed'] else 'no'} |"
        )
    lines.append(
        f"| hard targets, the whole training split ({sec.full_rows} rows) | | "
        f"{pct(sec.full_accuracy)} | | |"
    )
    return "\n".join(lines)


def plot_small_data(sec: SmallData, out: Path) -> Path:
    return line_chart(out / "small-data.png", sec.curves, "epoch", "test error rate")


# ------------------------------------------------------------------------------------ consistency
def render_consistency(sec: Consistency) -> str:
    lines = [
        f"Transfer set `{sec.spec}`; augmentation `{sec.augment}`; student {sec.epochs} epochs, "
        f"T = {sec.temperature:g}, alpha = {sec.alpha:g} (hard labels: alpha = 0); seeds "
        f"{', '.join(map(str, sec.seeds))} (mean ± standard deviation). Wall time: the mean "
        "student run, plus the cache's writing time (the teacher's) for cached arms; online KD "
        "runs the teacher inside every step.",
        "",
        "| arm | views | test errors | NLL | ECE | wall time (s) | of which teacher (s) | cache "
        "bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, a in sec.arms.items():
        lines.append(
            f"| {label} | {a['mode']} | {a['errors_mean']:.1f} ± {a['errors_std']:.1f} | "
            f"{a['nll_mean']:.3f} | {a['ece_mean']:.3f} | {a['wall_mean']:.1f} | "
            f"{a['teacher_seconds']:.1f} | {a['bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines)


def plot_consistency(sec: Consistency, out: Path) -> Path:
    from pipeline.experiments.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    views = [(a["views"], a) for a in sec.arms.values() if a["views"]]
    ks = [k for k, _ in views]
    ax.errorbar(
        ks,
        [a["errors_mean"] for _, a in views],
        yerr=[a["errors_std"] for _, a in views],
        marker="o",
        label="view cache (consistent)",
    )
    for label, style in ((sec.online_label, "-"), ("single-view cache + live augmentation", "--")):
        a = sec.arms[label]
        ax.axhline(a["errors_mean"], linestyle=style, color="gray" if style == "--" else "k")
        ax.text(ks[-1] if ks else 1, a["errors_mean"], label, fontsize=7, va="bottom", ha="right")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("views per sample K")
    ax.set_ylabel("test errors (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out / "consistency.png")


# By record type: each experiment's record has its own rendering and chart.
_RENDERERS: dict[type, Callable] = {
    MainTable: render_main_table,
    Temperature: render_temperature,
    OmittedClass: render_omitted_class,
    SmallData: render_small_data,
    Consistency: render_consistency,
}
_PLOTTERS: dict[type, Callable] = {
    MainTable: plot_main_table,
    Temperature: plot_temperature,
    OmittedClass: plot_omitted_class,
    SmallData: plot_small_data,
    Consistency: plot_consistency,
}
