"""``kd-pipeline``: the click group behind the console script. One typed function per command, wiring only."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import click

from pipeline import __version__
from pipeline.errors import KDError

DEVICE_HELP = "Where to run: auto (CUDA when present, else MPS, else CPU), cpu, cuda, cuda:N or mps."


class KDGroup(click.Group):
    """Prints library errors as one clear message (exit 2) instead of a traceback."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except KDError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


def common(fn: Callable) -> Callable:
    """``--device`` and ``--seed``, on every command that computes."""

    @click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
    @click.option("--seed", default=0, show_default=True, type=int,
                  help="Seed for weight initialisation, dropout and shuffling (dataset subsets take their own seed=).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return fn(*args, **kwargs)

    return wrapper


def data_dir_option(fn: Callable) -> Callable:
    return click.option("--data-dir", default=None, type=click.Path(file_okay=False),
                        help="Directory with dataset files for specs such as mnist:train (else $KD_DATA_DIR).")(fn)


def storage_option(fn: Callable) -> Callable:
    """``--storage-option KEY=VALUE`` (repeatable): fsspec options for s3:// caches beyond the AWS environment."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="Option for an s3:// cache's filesystem, e.g. endpoint_url=http://host:9000 or "
                             "profile=team (credentials and endpoint otherwise come from the AWS_* environment "
                             "variables); repeatable.")(fn)


def storage_options_of(items: tuple[str, ...]) -> dict:
    from pipeline.cache.location import parse_storage_options

    return parse_storage_options(items)


def train_options(fn: Callable) -> Callable:
    """Optimiser options shared by every training command (their defaults train stably for T in [1, 20])."""
    opts = [
        click.option("--epochs", default=10, show_default=True, type=int, help="Passes over the training data."),
        click.option("--batch-size", default=128, show_default=True, type=int, help="Rows per optimiser step."),
        click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak learning rate."),
        click.option("--optimizer", default="adam", show_default=True, type=click.Choice(["adam", "adamw", "sgd"]),
                     help="Optimiser (sgd uses --momentum)."),
        click.option("--momentum", default=0.9, show_default=True, type=float, help="SGD momentum."),
        click.option("--weight-decay", default=0.0, show_default=True, type=float, help="L2 weight decay."),
        click.option("--grad-clip", default=5.0, show_default=True, type=float,
                     help="Clip the gradient norm to this (0 disables)."),
        click.option("--lr-schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "constant"]),
                     help="Learning-rate schedule over all steps."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def make_train_config(kw: dict, seed: int):  # noqa: ANN201
    from pipeline.training.loop import TrainConfig

    return TrainConfig(epochs=kw.pop("epochs"), batch_size=kw.pop("batch_size"), lr=kw.pop("lr"),
                       optimizer=kw.pop("optimizer"), momentum=kw.pop("momentum"),
                       weight_decay=kw.pop("weight_decay"), grad_clip=kw.pop("grad_clip") or None,
                       lr_schedule=kw.pop("lr_schedule"), seed=seed)


def default_out(kind: str, name: str) -> str:
    from pipeline.datasets import data_root

    return str(data_root() / kind / name)


@click.group(cls=KDGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="kd-pipeline")
def main() -> None:
    """Knowledge distillation (Hinton, Vinyals & Dean 2015) in two stages.

    Stage one (cache-logits) runs a teacher ensemble once over a transfer set and stores its raw logits in a Zarr
    cache; stage two (train-student) trains students from that cache, so sweeping temperature, weight and student
    costs only student training.

    Dataset specs: NAME:SPLIT[:key=value...], e.g. fashion-mnist:train, mnist:test, idx:DIR:train, npz:FILE:train,
    with modifiers exclude=3 | keep=0,1 | fraction=0.03 | count=1000 | seed=N.
    """


@main.command("train-teacher")
@click.option("--dataset", default="fashion-mnist:train", show_default=True, help="Labeled training set spec.")
@click.option("--model", default="mlp:1200,1200", show_default=True,
              help="Model spec: mlp:H1,H2,...[:key=value], cnn[:...], torchscript:PATH, py:module:factory.")
@click.option("--input-dropout", default=None, type=float, help="Dropout on the inputs (mlp) [default: 0.2].")
@click.option("--dropout", default=None, type=float,
              help="Dropout on hidden units (mlp [default: 0.5]; cnn [default: its spec's, 0.25]).")
@click.option("--max-norm", default=None, type=float,
              help="Max-norm constraint on each hidden unit's incoming weights (mlp).")
@click.option("--jitter", default=2, show_default=True, type=int,
              help="Random shifts of up to N pixels per image each step (0 disables).")
@click.option("--members", default=3, show_default=True, type=int, help="Ensemble size (one seed per member).")
@click.option("--eval", "eval_spec", default=None,
              help="Labeled test set evaluated after each epoch [default: the training set's test split; '' skips].")
@click.option("--out", default=None, help="Ensemble directory [default: data/teachers/<model>].")
@train_options
@data_dir_option
@common
def train_teacher(dataset: str, model: str, input_dropout: float | None, dropout: float | None,
                  max_norm: float | None, jitter: int, members: int, eval_spec: str | None, out: str | None,
                  device: str, seed: int, data_dir: str | None, **kw: object) -> None:
    """Train a teacher ensemble; writes member-<i>.pt checkpoints and ensemble.json under --out."""
    from pipeline.config import TeacherConfig
    from pipeline.training.teacher import train_teacher

    cfg = TeacherConfig(dataset=dataset, model=model, input_dropout=input_dropout, dropout=dropout,
                        max_norm=max_norm, jitter=jitter, members=members, eval=eval_spec,
                        out=out or default_out("teachers", model.replace(":", "-").replace(",", "-")),
                        device=device, data_dir=data_dir, train=make_train_config(kw, seed))
    train_teacher(cfg, log=click.echo)
    click.echo(f"wrote {cfg.out}; next: kd-pipeline cache-logits --teacher {cfg.out} --dataset {dataset}")


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True),
              help="A checkpoint (.pt) or an ensemble directory.")
@click.option("--dataset", default="fashion-mnist:test", show_default=True, help="Labeled dataset spec.")
@click.option("--ensemble", default="mean-probs", show_default=True, type=click.Choice(["mean-probs", "mean-logits"]),
              help="How members are combined: arithmetic (mean-probs) or geometric (mean-logits) mean.")
@click.option("--batch-size", default=1024, show_default=True, type=int, help="Rows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@data_dir_option
@common
def evaluate(model_path: str, dataset: str, ensemble: str, batch_size: int, as_json: bool, device: str, seed: int,
             data_dir: str | None) -> None:
    """Test errors (count), accuracy, NLL and ECE of a checkpoint or an ensemble and its members."""
    from pipeline.config import EvaluateConfig
    from pipeline.evaluation import evaluate_models

    res = evaluate_models(EvaluateConfig(model=model_path, dataset=dataset, ensemble=ensemble, batch_size=batch_size,
                                  device=device, data_dir=data_dir))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{'model':<28} {'errors':>7} {'accuracy':>9} {'NLL':>7} {'ECE':>7}   on {res['dataset']}")
    rows = [(Path(p).name, m) for p, m in zip(res["paths"], res["members"], strict=True)]
    if len(rows) > 1:
        rows.append((f"ensemble ({res['method']})", res["ensemble"]))
    for name, m in rows:
        click.echo(f"{name:<28} {m['errors']:>7} {m['accuracy']:>9.4f} {m['nll']:>7.4f} {m['ece']:>7.4f}")


@main.command("cache-logits")
@click.option("--teacher", "teachers", multiple=True, required=True, type=click.Path(exists=True),
              help="A teacher checkpoint or ensemble directory (each member becomes a cache member); repeatable.")
@click.option("--dataset", default="fashion-mnist:train", show_default=True, help="Transfer set spec.")
@click.option("--out", required=True,
              help="The cache: a directory (e.g. data/caches/fmnist.zarr) or s3://bucket/prefix/NAME.zarr.")
@click.option("--dtype", default=None, type=click.Choice(["float16", "float32"]),
              help="Storage dtype of the logits [default: float16 for a new cache, the cache's own on resume].")
@click.option("--batch-size", default=1024, show_default=True, type=int, help="Rows per teacher forward pass.")
@click.option("--rows-per-shard", default=None, type=int,
              help="Rows per shard, the unit of writing, resuming and reading [default: 4096 for a new cache].")
@click.option("--workers", default=0, show_default=True, type=int,
              help="Start a dask LocalCluster of N worker processes and map shards over them (0: this process).")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler to use instead of --workers.")
@click.option("--add-member", is_flag=True, help="Add the given teacher(s) to an existing complete cache.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
@data_dir_option
@common
def cache_logits(teachers: tuple[str, ...], dataset: str, out: str, dtype: str | None, batch_size: int,
                 rows_per_shard: int | None, workers: int, scheduler: str | None, add_member: bool, quiet: bool,
                 storage_options: tuple[str, ...], device: str, seed: int, data_dir: str | None) -> None:
    """Stage one: run the teachers once over the transfer set into a Zarr logit cache.

    Re-running the same command resumes an interrupted cache (only missing shards are computed) and is a no-op on
    a complete one. A different teacher or dataset for an existing cache is refused.
    """
    from pipeline.cache.writer import build_cache
    from pipeline.config import CacheConfig

    cfg = CacheConfig(teachers=list(teachers), dataset=dataset, out=out, dtype=dtype, batch_size=batch_size,
                      rows_per_shard=rows_per_shard, device=device, workers=workers, scheduler=scheduler,
                      add_member=add_member, data_dir=data_dir, storage_options=storage_options_of(storage_options),
                      command=shlex.join(["kd-pipeline", *sys.argv[1:]]))
    res = build_cache(cfg, log=click.echo, progress=not quiet)
    click.echo(res.message)
    if res.status != "already-complete":
        click.echo(f"next: kd-pipeline cache info {out}  |  kd-pipeline train-student --cache {out} ...")


def parse_size(value: str) -> int:
    """``512M``, ``2G``, ``1.5GiB``, ``1000000`` -> bytes."""
    v = value.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(v[-1:], 1)
    try:
        return int(float(v[:-1] if scale > 1 else v) * scale)
    except ValueError:
        raise click.BadParameter(f"expected a size like 512M or 2G, got {value!r}") from None


def parse_class_bias(items: tuple[str, ...]) -> dict[int, float]:
    out: dict[int, float] = {}
    for item in items:
        cls, eq, delta = item.partition("=")
        try:
            out[int(cls)] = float(delta)
        except ValueError:
            raise click.BadParameter(f"expected CLASS=DELTA like 3=+3.5, got {item!r}") from None
        if not eq:
            raise click.BadParameter(f"expected CLASS=DELTA like 3=+3.5, got {item!r}")
    return out


@main.command("train-student")
@click.option("--cache", default=None,
              help="The logit cache made by cache-logits (its dataset is used): a directory, NAME.zarr.zip or "
                   "s3://bucket/prefix/NAME.zarr.")
@click.option("--student", default="mlp:800,800", show_default=True, help="Student model spec.")
@click.option("--temperature", "-T", default=20.0, show_default=True, type=float,
              help="Softmax temperature of the soft targets (and of the student in the soft term).")
@click.option("--alpha", default=0.9, show_default=True, type=float,
              help="Weight of the soft term; 1 - alpha weighs the hard-label cross-entropy (1 = soft only).")
@click.option("--loss", default="kd", show_default=True, type=click.Choice(["kd", "logit-mse"]),
              help="kd: T^2 KL at temperature T; logit-mse: squared logit difference (the high-T limit).")
@click.option("--ensemble", default="mean-probs", show_default=True, type=click.Choice(["mean-probs", "mean-logits"]),
              help="Combine members by arithmetic mean of probabilities at T, or geometric mean (mean of logits).")
@click.option("--members", default=None, help="Comma-separated member indices of the cache to use [default: all].")
@click.option("--eval", "eval_spec", default=None,
              help="Labeled test set [default: the transfer set's test split, e.g. fashion-mnist:test].")
@click.option("--class-bias", multiple=True, help="CLASS=DELTA added to the student's logit bias after training.")
@click.option("--fit-bias-on", default=None,
              help="Labeled held-out set on which to fit bias offsets for classes absent from the transfer set.")
@click.option("--memory-budget", default="2G", show_default=True,
              help="Memory for targets+inputs: train from memory when they fit, else stream shards.")
@click.option("--allow-partial", is_flag=True, help="Train on the finished shards of a partial cache.")
@click.option("--online-teacher", multiple=True, type=click.Path(exists=True),
              help="Baseline: soft targets from a live teacher forward pass each batch instead of a cache.")
@click.option("--dataset", default=None, help="Transfer set for --online-teacher.")
@click.option("--out", default=None,
              help="Run directory [default: data/runs/<cache>-<student>-<loss>-<ensemble>-T<T>-a<alpha>"
                   "[-m<members>]-s<seed>].")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@train_options
@storage_option
@data_dir_option
@common
def train_student(cache: str | None, student: str, temperature: float, alpha: float, loss: str, ensemble: str,
                  members: str | None, eval_spec: str | None, class_bias: tuple[str, ...], fit_bias_on: str | None,
                  memory_budget: str, allow_partial: bool, online_teacher: tuple[str, ...], dataset: str | None,
                  out: str | None, quiet: bool, storage_options: tuple[str, ...], device: str, seed: int,
                  data_dir: str | None, **kw: object) -> None:
    """Stage two: train a student on cached soft targets at temperature T plus weighted hard labels."""
    from pipeline.config import StudentConfig
    from pipeline.training.distill import train_student as step

    try:
        member_list = [int(m) for m in members.split(",")] if members else None
    except ValueError:
        raise click.BadParameter(f"expected indices like 0,2, got {members!r}", param_hint="--members") from None
    source = Path(cache.rstrip("/")).name.removesuffix(".zip").removesuffix(".zarr") if cache else "online"
    name = (f"{source}-{student.replace(':', '-').replace(',', '-')}-{loss}-{ensemble}-T{temperature:g}-a{alpha:g}"
            + (f"-m{'.'.join(map(str, member_list))}" if member_list else "") + f"-s{seed}")
    cfg = StudentConfig(cache=cache or "", student=student, temperature=temperature, alpha=alpha, loss=loss,
                        ensemble=ensemble, members=member_list, eval=eval_spec, class_bias=parse_class_bias(class_bias),
                        fit_bias_on=fit_bias_on, memory_budget=parse_size(memory_budget), allow_partial=allow_partial,
                        online_teacher=list(online_teacher) or None, dataset=dataset,
                        out=out or default_out("runs", name), device=device, data_dir=data_dir,
                        train=make_train_config(kw, seed), storage_options=storage_options_of(storage_options))
    step(cfg, log=(lambda s: None) if quiet else click.echo, progress=not quiet)
    click.echo(f"wrote {cfg.out} (student.pt, metrics.json, history.csv, config.json)")


def parse_floats(value: str, option: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected numbers like 1,2,4, got {value!r}", param_hint=option) from None


def parse_ints(value: str | None, option: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected integers like 0,1,2, got {value!r}", param_hint=option) from None


@main.command()
@click.option("--cache", default=None, help="The logit cache every setting trains from.")
@click.option("--temperature", "-T", "temperatures", default="1,2,4,8,20", show_default=True,
              help="Comma-separated temperatures.")
@click.option("--alpha", "alphas", default="0.5,0.9,1.0", show_default=True,
              help="Comma-separated soft-term weights (1 - alpha weighs the hard labels).")
@click.option("--student", "students", multiple=True,
              help="Student model spec; repeat for several [default: mlp:800,800].")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds (one run per seed).")
@click.option("--loss", default="kd", show_default=True, type=click.Choice(["kd", "logit-mse"]),
              help="The loss of every setting (see train-student).")
@click.option("--ensemble", default="mean-probs", show_default=True, type=click.Choice(["mean-probs", "mean-logits"]),
              help="How cache members are combined (see train-student).")
@click.option("--members", default=None, help="Comma-separated member indices of the cache [default: all].")
@click.option("--eval", "eval_spec", default=None,
              help="Labeled test set [default: the transfer set's test split].")
@click.option("--memory-budget", default="2G", show_default=True, help="Per setting (see train-student).")
@click.option("--online-teacher", multiple=True, type=click.Path(exists=True),
              help="Baseline: every setting distils from a live teacher forward pass instead of a cache.")
@click.option("--dataset", default=None, help="Transfer set for --online-teacher.")
@click.option("--workers", default=None, type=int,
              help="Worker processes of a local dask cluster [default: 2]; 0 runs settings one by one here.")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler (instead of --workers).")
@click.option("--threads-per-worker", default=0, show_default=True, type=int,
              help="Torch threads per worker (0: the cores divided by the workers, so they do not oversubscribe).")
@click.option("--out", default=None, help="Sweep directory [default: data/sweeps/<cache>].")
@click.option("--dry-run", is_flag=True, help="Print the grid and its estimated cost; train nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@train_options
@data_dir_option
@storage_option
@click.pass_context
def sweep(ctx: click.Context, cache: str | None, temperatures: str, alphas: str, students: tuple[str, ...],
          seeds: str, loss: str, ensemble: str, members: str | None, eval_spec: str | None, memory_budget: str,
          online_teacher: tuple[str, ...], dataset: str | None, workers: int | None, scheduler: str | None,
          threads_per_worker: int, out: str | None, dry_run: bool, quiet: bool, device: str, data_dir: str | None,
          storage_options: tuple[str, ...], **kw: object) -> None:
    """Train a grid (students x temperatures x alphas x seeds) from one cache, each setting a dask task.

    Each setting is exactly one train-student run with its own run directory under OUT/runs. Results stream into
    OUT/results.csv and results.json as settings finish; the end prints a Markdown table (best per student in bold)
    and writes OUT/test_error_vs_temperature.png. Re-running the same command resumes: finished settings are read
    back, failed or missing ones are trained. Exit status 1 if any setting failed, 130 if interrupted.
    """
    from pipeline.config import SweepConfig
    from pipeline.experiments.sweep import sweep_command

    name = Path(cache.rstrip("/")).name.removesuffix(".zip").removesuffix(".zarr") if cache else "online"
    cfg = SweepConfig(cache=cache or "", temperatures=parse_floats(temperatures, "--temperature"),
                      alphas=parse_floats(alphas, "--alpha"), students=list(students) or ["mlp:800,800"],
                      seeds=parse_ints(seeds, "--seeds") or [], loss=loss, ensemble=ensemble,
                      members=parse_ints(members, "--members"), eval=eval_spec,
                      memory_budget=parse_size(memory_budget), online_teacher=list(online_teacher) or None,
                      dataset=dataset, workers=workers, scheduler=scheduler, torch_threads=threads_per_worker,
                      out=out or default_out("sweeps", name), device=device, data_dir=data_dir,
                      storage_options=storage_options_of(storage_options), train=make_train_config(kw, 0))
    res = sweep_command(cfg, log=click.echo, progress=not quiet, dry_run=dry_run)
    if res is not None and res.interrupted:
        ctx.exit(130)
    if res is not None and res.failed:
        click.echo(f"{res.failed} setting(s) failed (see the error column and each run's error.txt); re-run the "
                   "same command to retry them", err=True)
        ctx.exit(1)


@main.command()
@click.argument("experiment", default="all")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="A dataset source without its split: fashion-mnist, mnist, idx:DIR or npz:FILE.")
@click.option("--scale", default="quick", show_default=True, type=click.Choice(["quick", "full"]),
              help="quick: a subset and few epochs (minutes, a smoke test); full: the real run.")
@click.option("--teacher", default=None, type=click.Path(exists=True),
              help="Use this teacher ensemble instead of training the dataset's recipe.")
@click.option("--omitted-class", default=3, show_default=True, type=int,
              help="omitted-class: the class left out of the transfer set.")
@click.option("--kept-classes", default="7,8", show_default=True,
              help="omitted-class: the only classes of the two-class transfer set.")
@click.option("--student", default="mlp:800,800", show_default=True, help="The (wide) student.")
@click.option("--narrow-student", default="mlp:30,30", show_default=True, help="temperature: the narrow student.")
@click.option("--out", default=None, help="Output directory [default: data/reproduce/<dataset>-<scale>].")
@click.option("--report", default=None,
              help="Also write the report here, its plots beside it (e.g. data/reports/fashion-mnist.md).")
@data_dir_option
@common
def reproduce(experiment: str, dataset: str, scale: str, teacher: str | None, omitted_class: int, kept_classes: str,
              student: str, narrow_student: str, out: str | None, report: str | None, data_dir: str | None,
              device: str, seed: int) -> None:
    """The paper's experiments over the public stages, with a Markdown report next to the paper's numbers.

    EXPERIMENT is all (default) or a comma-separated list of: main-table (teacher vs baseline vs distilled
    student at T = 20), temperature (test error vs T for a wide and a narrow student, via the sweep),
    omitted-class (a transfer set without one class, before and after bias correction; and a two-class transfer
    set), small-data (3 % of the training set: hard vs soft targets). Artefacts are reused when re-run.
    """
    from pipeline.experiments import reproduce as step

    name = dataset.replace(":", "-").replace("/", "_").strip("-_")
    cfg = step.ReproduceConfig(experiment=experiment, dataset=dataset, data_dir=data_dir, scale=scale,
                               out=out or default_out("reproduce", f"{name}-{scale}"), report=report,
                               teacher=teacher,
                               omitted_class=omitted_class, kept_classes=parse_ints(kept_classes, "--kept-classes"),
                               student=student, narrow_student=narrow_student, device=device, seed=seed)
    step.run_reproduce(cfg, log=click.echo)


def specialist_options(fn: Callable) -> Callable:
    """The options every ``specialists`` step takes: one resolved config describes the whole output directory."""
    opts = [
        click.option("--cache", required=True, help="The generalist's logit cache on the transfer set."),
        click.option("--out", default=None, help="Output directory [default: data/specialists/<cache>]."),
        click.option("--generalist", multiple=True, type=click.Path(exists=True),
                     help="The cache members' checkpoints or ensemble directory (run on the test set, and the "
                          "specialists' initial weights) [default: the paths the cache records]."),
        click.option("--specialists", "k", default=None, type=int,
                     help="Number of class clusters K [default: automatic, the largest K within 0.5 % of the best "
                          "modularity]."),
        click.option("--classes-per-specialist", default=None, type=int,
                     help="Typical classes per specialist N (K = ceil(C / N)) instead of --specialists."),
        click.option("--similarity", default="log-moment", show_default=True,
                     type=click.Choice(["log-moment", "covariance"]),
                     help="Matrix whose columns k-means clusters: log E[p pT] (covariance + mean outer product) or "
                          "the raw covariance of the predicted probabilities."),
        click.option("--model", default=None,
                     help="Specialist model spec [default: the generalist members' own, initialised from one]."),
        click.option("--init", default="auto", show_default=True,
                     type=click.Choice(["auto", "generalist", "scratch"]),
                     help="Start from a generalist member's weights (auto: when the architecture is the same)."),
        click.option("--init-member", default=0, show_default=True, type=int,
                     help="Which cache member initialises the specialists."),
        click.option("--temperature", "-T", default=4.0, show_default=True, type=float,
                     help="Temperature of the collapsed soft targets."),
        click.option("--alpha", default=0.5, show_default=True, type=float,
                     help="Weight of the soft term; 1 - alpha weighs the hard labels."),
        click.option("--max-rows", default=None, type=int,
                     help="Cap on each specialist's training rows (half its classes, half the rest)."),
        click.option("--top-n", default=1, show_default=True, type=int,
                     help="Activate specialists whose classes meet the generalist's top-n classes."),
        click.option("--kl-steps", default=300, show_default=True, type=int,
                     help="Gradient steps of the combination (Adam on q's logits)."),
        click.option("--kl-lr", default=0.1, show_default=True, type=float, help="Step size of the combination."),
        click.option("--no-dustbin-correction", is_flag=True,
                     help="Do not raise the dustbin logit by log(oversampling) after training."),
        click.option("--workers", default=0, show_default=True, type=int,
                     help="Train specialists as tasks on a dask LocalCluster of N processes (0 or 1: in-process)."),
        click.option("--eval", "eval_spec", default=None,
                     help="Labeled test set [default: the transfer set's test split]."),
        storage_option,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _specialists_config(kw: dict, seed: int, device: str, data_dir: str | None):  # noqa: ANN202
    from pipeline.config import SpecialistsConfig

    cache = kw.pop("cache")
    generalist = list(kw.pop("generalist")) or None
    train = make_train_config(kw, seed)
    return SpecialistsConfig(
        cache=cache, out=kw.pop("out") or default_out("specialists", Path(cache).name.removesuffix(".zarr")),
        generalist=generalist, specialists=kw.pop("k"), classes_per_specialist=kw.pop("classes_per_specialist"),
        similarity=kw.pop("similarity"), model=kw.pop("model"), init=kw.pop("init"),
        init_member=kw.pop("init_member"), temperature=kw.pop("temperature"), alpha=kw.pop("alpha"),
        max_rows=kw.pop("max_rows"), top_n=kw.pop("top_n"), kl_steps=kw.pop("kl_steps"), kl_lr=kw.pop("kl_lr"),
        dustbin_correction=not kw.pop("no_dustbin_correction"), workers=kw.pop("workers"),
        eval=kw.pop("eval_spec"), device=device, data_dir=data_dir, train=train,
        storage_options=storage_options_of(kw.pop("storage_options")))


@main.group("specialists", cls=KDGroup)
def specialists_group() -> None:
    """Specialist ensembles (paper section 5) on a generalist's logit cache.

    \b
    cluster   group the classes the generalist confuses (k-means on its co-prediction matrix's columns)
    train     one specialist per group: its classes + a dustbin, half its classes and half the rest,
              soft targets from the cache collapsed onto its classes, initialised from the generalist
    evaluate  combine generalist and specialists on the test set (KL combination) and write report.md
    run       all three in order

    Every step takes the same options and writes into one --out directory (config.json, clusters.json/.md,
    specialists/<k>/specialist.pt, specialists.json, evaluation.json, report.md).
    """


def _specialists_step(steps: tuple[str, ...], name: str, doc: str) -> None:
    @specialists_group.command(name, help=doc)
    @specialist_options
    @train_options
    @data_dir_option
    @common
    def command(device: str, seed: int, data_dir: str | None, **kw: object) -> None:
        from pipeline.experiments.specialists import run_steps

        cfg = _specialists_config(kw, seed, device, data_dir)
        run_steps(cfg, steps, log=click.echo)
        click.echo(f"wrote {cfg.out}")


_specialists_step(("cluster",), "cluster", "Cluster the classes by the generalist's confusions (clusters.md).")
_specialists_step(("train",), "train", "Train one specialist per cluster of two or more classes (--workers N: dask).")
_specialists_step(("evaluate",), "evaluate",
                  "Combine generalist and specialists on the test set; accuracy, per class, Table 4 (report.md).")
_specialists_step(("cluster", "train", "evaluate"), "run", "cluster, train and evaluate in one go.")


@main.group("cache", cls=KDGroup)
def cache_group() -> None:
    """Inspect, verify, bundle, copy and list logit caches.

    CACHE is a directory, a single-file bundle NAME.zarr.zip, or s3://bucket/prefix/NAME.zarr (credentials and
    endpoint from the AWS_* environment variables, --storage-option KEY=VALUE for the rest).
    """


@cache_group.command("info")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@storage_option
def cache_info(cache: str, as_json: bool, storage_options: tuple[str, ...]) -> None:
    """Describe CACHE: rows, classes, members, dtype, codecs, shards done, size, dataset, completeness."""
    from pipeline.cache.format import LogitCache
    from pipeline.cache.location import CacheLocation

    location = CacheLocation.parse(cache, storage_options_of(storage_options))
    info = LogitCache(location, allow_partial=True).info().to_dict()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(format_cache_info(info))


@cache_group.command("verify")
@click.argument("cache")
@click.option("--dataset", default=None, help="A dataset spec whose fingerprint must match the cache's.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
@data_dir_option
def cache_verify(cache: str, dataset: str | None, quiet: bool, storage_options: tuple[str, ...],
                 data_dir: str | None) -> None:
    """Read every chunk of CACHE (checksums) and check it against the format: exit 1 naming each problem."""
    from pipeline.cache.location import CacheLocation
    from pipeline.cache.sharing import verify_cache

    report = verify_cache(CacheLocation.parse(cache, storage_options_of(storage_options)),
                          dataset=dataset, data_dir=data_dir, progress=not quiet)
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)


@cache_group.command("pack")
@click.argument("cache")
@click.argument("out")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
def cache_pack(cache: str, out: str, quiet: bool, storage_options: tuple[str, ...]) -> None:
    """Bundle CACHE into the single file OUT (NAME.zarr.zip), written once, then verified."""
    from pipeline.cache.location import CacheLocation
    from pipeline.cache.sharing import pack_cache

    source = CacheLocation.parse(cache, storage_options_of(storage_options))
    res = pack_cache(source, out, progress=not quiet, log=click.echo)
    click.echo(res.message)


@cache_group.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@storage_option
def cache_copy(src: str, dst: str, quiet: bool, storage_options: tuple[str, ...]) -> None:
    """Copy SRC to DST (directory, NAME.zarr.zip or s3://), verify the copy; a re-run resumes an interrupted one."""
    from pipeline.cache.location import CacheLocation
    from pipeline.cache.sharing import copy_cache

    opts = storage_options_of(storage_options)
    res = copy_cache(CacheLocation.parse(src, opts), CacheLocation.parse(dst, opts),
                     progress=not quiet, log=click.echo)
    click.echo(res.message)


@cache_group.command("ls")
@click.argument("prefix")
@storage_option
def cache_ls(prefix: str, storage_options: tuple[str, ...]) -> None:
    """List the caches under PREFIX (a directory or s3://bucket/prefix), one summary line each."""
    from pipeline.cache.location import CacheLocation
    from pipeline.cache.sharing import list_caches

    found = list_caches(CacheLocation.parse(prefix, storage_options_of(storage_options)))
    for s in found:
        click.echo(s.line())
    click.echo(f"{len(found)} cache(s) under {prefix}")


def format_cache_info(i: dict) -> str:
    ratio = i["size_on_disk"] / i["raw_float32_size"] if i["raw_float32_size"] else float("nan")
    lines = [
        f"cache      {i['location']}  ({i['format']} v{i['version']})",
        f"status     {'complete' if i['complete'] else 'PARTIAL'}: {len(i['shards_done'])}/{i['n_shards']} shards "
        f"done by every member ({i['rows_per_shard']} rows per shard)",
        f"rows       {i['n']}  ({'labeled' if i['labeled'] else 'unlabeled'})",
        f"classes    {i['num_classes']}: {', '.join(i['class_names'])}",
        f"dtype      {i['dtype']}  codecs {' -> '.join(i['codecs'])}",
        f"size       {i['size_on_disk'] / 2**20:.2f} MiB on disk vs {i['raw_float32_size'] / 2**20:.2f} MiB raw "
        f"float32 ({ratio:.2f}x)",
        f"dataset    {i['dataset']['spec']}  n={i['dataset']['n']}  {i['dataset']['fingerprint']}",
        f"members    {len(i['members'])}",
    ]
    for m in i["members"]:
        acc = (m.get("metrics") or {}).get("accuracy")
        lines.append(f"  [{m['index']}] {m['model_spec']}  {m['checkpoint_sha256'][:23]}…  {m['path']}"
                     + (f"  test acc {acc:.4f}" if acc is not None else ""))
    lines.append(f"created    {i['created']} by kd-pipeline {i['tool_version']}: {i['command']}")
    return "\n".join(lines)


@main.command()
@click.option("--scale", default="small", show_default=True, type=click.Choice(["small", "medium", "large"]),
              help="small: 10k rows (about two minutes on 2 CPU cores); medium/large: 60k rows.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--out", default=None, help="Write every figure, with the machine, to this JSON file.")
def bench(scale: str, device: str, out: str | None) -> None:
    """Measure what the cache buys, as ratios in one run (P1 epoch cost, P3 caching overhead, P4 streaming, P5 size)."""
    from pipeline.experiments.bench import run_bench

    run_bench(scale, device, out, click.echo)


@main.command()
@click.option("--out", default=None, help="Where the demo writes [default: data/demo].")
@click.option("--epochs", default=3, show_default=True, type=int, help="Teacher epochs.")
@click.option("--members", default=2, show_default=True, type=int, help="Teacher ensemble size.")
@click.option("--model", default="mlp:1200,1200", show_default=True, help="Teacher model spec.")
@click.option("--student", default="mlp:800,800", show_default=True, help="Student model spec.")
@click.option("--student-epochs", default=20, show_default=True, type=int, help="Epochs of each student.")
@click.option("--temperatures", default="4,20", show_default=True, help="Comma-separated temperatures to distil at.")
@click.option("--alpha", default=0.9, show_default=True, type=float, help="Soft-term weight of distilled students.")
@click.option("--transfer-fraction", default=0.05, show_default=True, type=float,
              help="Fraction of the training images in the transfer set the students learn from (1 = all).")
@click.option("--train-subset", default=None, type=float,
              help="Fraction of fashion-mnist:train for the teacher and, as is, for the students (a quick run).")
@common
def demo(out: str | None, epochs: int, members: int, model: str, student: str, student_epochs: int,
         temperatures: str, alpha: float, transfer_fraction: float, train_subset: float | None, device: str,
         seed: int) -> None:
    """The main job on the shipped Fashion-MNIST: teacher ensemble, logit cache, baseline vs distilled students."""
    from pipeline.experiments import demo as step

    try:
        temps = [float(t) for t in temperatures.split(",") if t]
    except ValueError:
        raise click.BadParameter(f"expected numbers like 4,20, got {temperatures!r}") from None
    step.run_demo(step.DemoConfig(out=out or default_out("demo", ""), epochs=epochs, members=members, model=model,
                             student=student, student_epochs=student_epochs, temperatures=temps, alpha=alpha,
                             transfer_fraction=transfer_fraction or None, train_subset=train_subset, device=device,
                             seed=seed), log=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
