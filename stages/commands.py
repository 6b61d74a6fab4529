"""The ``kd-pipeline`` commands but ``cache`` and ``specialists``, imported when one is run (see
``stages/cli.py``: the group lists them without importing this module, or torch).

Every option is generated from the config field that declares it (``stages/params.py``); each
command only builds its configs, calls one library function and prints the outcome.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import click

from pipeline.cache.config import CacheConfig
from pipeline.errors import KDError
from pipeline.evaluation import EvaluateConfig
from pipeline.experiments.bench import BenchConfig
from pipeline.experiments.config import SweepConfig
from pipeline.experiments.demo import DemoConfig
from pipeline.experiments.reproduce import ReproduceConfig
from pipeline.experiments.sequence import SequenceStudyConfig
from pipeline.experiments.storage import StorageStudyConfig
from pipeline.step_options import Display
from pipeline.training.config import StudentConfig, TeacherConfig
from stages.params import Only, configured
from stages.show import evaluation_table, student_result_line


def quiet_log(display: Display) -> object:
    return (lambda s: None) if display.quiet else click.echo


@click.command("train-teacher")
@configured(TeacherConfig, Only(Display, "quiet"))
def train_teacher(cfg: TeacherConfig, display: Display) -> None:
    """Train a teacher ensemble; writes member-<i>.pt checkpoints and ensemble.json under --out."""
    from pipeline.metrics import teacher_result_line
    from pipeline.training.teacher import train_teacher as run

    summary = run(cfg, log=quiet_log(display), progress=not display.quiet)
    line = teacher_result_line(summary)
    if line and display.quiet:  # --quiet hides progress, never the result
        click.echo(line)
    click.echo(
        f"wrote {cfg.out}; next: kd-pipeline cache-logits --teacher {cfg.out} "
        f"--dataset {cfg.dataset}"
    )


@click.command()
@configured(EvaluateConfig, Only(Display, "json"))
def evaluate(cfg: EvaluateConfig, display: Display) -> None:
    """Test errors (count), accuracy, NLL and ECE of a checkpoint or an ensemble and its members."""
    from pipeline.evaluation import evaluate_models

    res = evaluate_models(cfg)
    click.echo(json.dumps(res, indent=2) if display.json else evaluation_table(res))


@click.command("cache-logits")
@configured(CacheConfig, Only(Display, "quiet"))
def cache_logits(cfg: CacheConfig, display: Display) -> None:
    """Stage one: run the teachers once over the transfer set into a Zarr logit cache.

    Re-running the same command resumes an interrupted cache (only missing shards are computed)
    and is a no-op on a complete one (also after --add-member added teachers to it). A different
    teacher or dataset for an existing cache is refused. Interrupted (Ctrl-C), it keeps every
    finished shard: re-running the same command resumes.
    """
    from pipeline.cache.writer import build_cache

    cfg = replace(cfg, command=shlex.join(["kd-pipeline", *sys.argv[1:]]))
    try:
        res = build_cache(cfg, log=click.echo, progress=not display.quiet)
    except KeyboardInterrupt:  # click would say only "Aborted!"
        click.echo(
            "\ninterrupted: every finished shard is kept; re-run the same command to resume",
            err=True,
        )
        sys.exit(130)
    click.echo(res.message)
    if res.status != "already-complete":
        click.echo(
            f"next: kd-pipeline cache info {cfg.out}  |  "
            f"kd-pipeline train-student --cache {cfg.out} ..."
        )


@click.command("train-student")
@configured(StudentConfig, Only(Display, "quiet"))
def train_student(cfg: StudentConfig, display: Display) -> None:
    """Stage two: train a student on cached soft targets at temperature T plus weighted hard
    labels.

    Re-running a finished run (the same config on the same cache, wherever the cache is read
    from) reuses it and prints its result, as demo and sweep do; --overwrite trains it again.
    """
    from pipeline.distributed import is_main_process
    from pipeline.experiments.sweep import finished_result, source_fingerprint
    from pipeline.training.distill import train_student as run

    cfg.validate()
    previous = None
    if not cfg.overwrite and (Path(cfg.out) / "metrics.json").is_file():
        try:
            previous = finished_result(cfg, source_fingerprint(cfg))
        except KDError:  # e.g. a partial cache: training says what is wrong, or trains
            previous = None
    if previous is not None:
        result, printed = previous, False
        click.echo(
            f"reusing the finished run in {cfg.out} (the same config on the same soft targets; "
            "--overwrite trains it again)"
        )
    else:
        result = run(cfg, log=quiet_log(display), progress=not display.quiet)
        printed = not display.quiet
    if is_main_process():  # under torchrun: rank 0 wrote it
        line = student_result_line(result)
        if line and not printed:  # --quiet hides progress, never the result
            click.echo(line)
        files = "student.pt, metrics.json, history.csv, metrics.jsonl, config.json, config.toml"
        tracked = "".join(f", {name}/" for name in cfg.train.log_to)  # a tracker's folder
        hf = ", hf/ (transformers)" if (Path(cfg.out) / "hf").is_dir() else ""
        click.echo(f"wrote {cfg.out} ({files}{tracked}{hf})")


@click.command()
@configured(SweepConfig, Only(Display, "dry_run", "quiet"))
@click.pass_context
def sweep(ctx: click.Context, cfg: SweepConfig, display: Display) -> None:
    """Train a grid (students x temperatures x alphas x seeds) from one cache, each setting a dask
    task.

    Each setting is exactly one train-student run, with every train-student option but the axes
    (-T, --alpha, --student, --seeds take lists here) and its run directory OUT/runs/<setting>.
    Results stream into OUT/results.csv and results.json as settings finish; the end prints a
    Markdown table (best per student in bold) and writes OUT/test_error_vs_temperature.png (a
    token cache: test perplexity and bits per byte, OUT/test_perplexity_vs_temperature.png).
    Re-running the same command resumes: finished settings are read back, failed or missing ones
    are trained. Exit status 1 if any setting failed, 130 if interrupted.
    """
    from pipeline.experiments.sweep import sweep_command

    res = sweep_command(cfg, log=click.echo, progress=not display.quiet, dry_run=display.dry_run)
    if res is not None and res.interrupted:
        ctx.exit(130)
    if res is not None and res.failed:
        click.echo(
            f"{res.failed} setting(s) failed (see the error column and each run's "
            "error.txt); re-run the same command to retry them",
            err=True,
        )
        ctx.exit(1)


@click.command()
@configured(ReproduceConfig)
def reproduce(cfg: ReproduceConfig) -> None:
    """The paper's experiments over the public stages, with a Markdown report next to the paper's
    numbers.

    EXPERIMENT is all (default) or a comma-separated list of: main-table (teacher vs baseline vs
    distilled student under a fair protocol: a validation split chooses every run's epoch, over
    --seeds), temperature (test error vs T for a wide and a narrow student,
    via the sweep), omitted-class (a transfer set without one class, before and after bias
    correction; and a two-class transfer set), small-data (3 % of the training set: hard vs soft
    targets). Artefacts are reused when re-run.
    """
    from pipeline.experiments.reproduce import run_reproduce

    run_reproduce(cfg, log=click.echo)


@click.command()
@configured(BenchConfig)
def bench(cfg: BenchConfig) -> None:
    """Measure what the cache buys, as ratios in one run: P1 epoch cost, P2 a sweep from the cache
    vs online KD, P3 caching overhead, P4 streaming vs the codec limit, P5 size (per storage
    kind too), P6 a top-k vs a dense loader epoch; each against its goal (met or not), with a
    warning when the machine is loaded or repeats disagree."""
    from pipeline.experiments.bench import run_bench

    run_bench(cfg.scale, cfg.device, cfg.out, click.echo)


@click.command("storage-study")
@configured(StorageStudyConfig)
def storage_study(cfg: StorageStudyConfig) -> None:
    """Cache one teacher in every storage kind (dense, topk:K, sampled:S) and train the same
    student from each: bytes per row, fidelity at T = 1, 4, 20 and test errors relative to the
    dense cache, in OUT/report.md."""
    from pipeline.experiments.storage import run_storage_study

    run_storage_study(cfg, log=click.echo)


@click.command("sequence-study")
@configured(SequenceStudyConfig)
def sequence_study(cfg: SequenceStudyConfig) -> None:
    """Distil a language model on the shipped corpus: teacher, dense/topk/sampled caches, students
    from each, next tokens only and online KD; perplexity, bits/byte, bytes/token in report.md."""
    from pipeline.experiments.sequence import run_sequence_study

    run_sequence_study(cfg, log=click.echo)


@click.command()
@configured(DemoConfig)
def demo(cfg: DemoConfig) -> None:
    """The main job on the shipped Fashion-MNIST: teacher ensemble, logit cache, baseline vs
    distilled students."""
    from pipeline.experiments.demo import run_demo

    run_demo(cfg, log=click.echo)
