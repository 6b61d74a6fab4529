"""Stage two: train a student from cached soft targets (or, as a baseline, from a live teacher).

:func:`train_student` is the one code path behind ``train-student`` (and sweeps, the demo and
the experiments). It is a recipe of four steps, each a function of its own: set up the soft-target
source (a cache, checked against the dataset it records, or a live teacher:
:func:`pipeline.training.soft_targets.setup_soft_targets`), build and check the student
(:func:`pipeline.training.classification.build_student`), fit it with
:func:`pipeline.training.fit` (:func:`fit_student`), and finish: correct biases
(:mod:`pipeline.training.bias`), measure, and write a run directory that describes itself
(:func:`finish_run`; what it records: :mod:`pipeline.training.run_dir`)::

    RUN_DIR/
      student.pt      checkpoint (weights_only-safe) with the resolved config, the cache
                      fingerprint and metrics
      metrics.json    test errors, accuracy, NLL, ECE, per-class errors, teacher agreement,
                      bias fitting
      history.csv     per epoch: loss parts, train errors, test errors, seconds
      config.json     the resolved config
      config.toml     the same run as a run file: train-student --config config.toml replays it
      hf/             an hf:DIR student, also as transformers' save_pretrained (safetensors) with
                      the tokenizer: AutoModelForCausalLM.from_pretrained(RUN_DIR/hf)

Under ``torchrun`` (see :mod:`pipeline.distributed`) every rank runs this recipe on its share of
each epoch; the student is trained through DDP, and rank 0 alone logs, evaluates and writes the run
directory, which records the world size and the effective batch (``distributed`` in
``config.json`` and ``metrics.json``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.checkpoints import save_checkpoint
from pipeline.data.lazy import is_lazy, workers_note
from pipeline.data.stream import watch_content
from pipeline.datasets import (
    Dataset,
)
from pipeline.devices import describe_device, resolve_device
from pipeline.distributed import (
    RECORD_ROWS_VAR,
    SINGLE,
    Ranks,
    RowRecorder,
    agree,
    broadcast,
    process_group,
)
from pipeline.errors import ConfigError
from pipeline.files import atomic_write_json
from pipeline.models import KDModel
from pipeline.runfile import write_run_file
from pipeline.training.bias import check_bias_options, shared_samples
from pipeline.training.classification import SoftTargets
from pipeline.training.config import StudentConfig
from pipeline.training.fit_callbacks import BestEpoch
from pipeline.training.loop import fit
from pipeline.training.run_dir import check_run_dir, run_config
from pipeline.training.soft_targets import setup_soft_targets


def train_student(
    cfg: StudentConfig, log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Train, correct, evaluate and save one student; returns what ``metrics.json`` holds.

    A recipe of named steps, each of which can be read (and tested) on its own:

    1. set up the soft-target source: a cache or a live teacher
       (:func:`~pipeline.training.soft_targets.setup_soft_targets`);
    2. build and check the student (:func:`~pipeline.training.classification.build_student`), and
       resolve what it is measured on (:func:`~pipeline.datasets.resolve_eval_set`;
       :func:`~pipeline.training.bias.check_bias_options`, so that a bad bias option fails before
       training, not after);
    3. fit it (:func:`fit_student`);
    4. finish: bias correction, evaluation, the run directory (:func:`finish_run`).

    Under torchrun each rank runs the steps on its share of the data; rank 0 alone logs and writes
    the run directory, and every rank returns rank 0's result.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    with process_group(device) as ranks:
        if not ranks.main:
            log, progress = (lambda line: None), False
        device = ranks.place(device)
        check_run_dir(cfg, log, ranks)
        t_start = time.perf_counter()
        targets = setup_soft_targets(cfg, device, log, ranks)
        task = targets.task
        refused = task.refused(cfg)
        if refused:  # an option this source cannot honour is refused, never ignored
            raise ConfigError(refused)
        # Ranks that opened another cache, read other data or got another command would train
        # apart (or hang in DDP): refuse before training.
        agree(
            ranks,
            {
                "config": run_config(cfg, ranks),
                "soft targets": targets.record,
                "rows": targets.source.num_rows,
                "steps per epoch": len(targets.source),
            },
        )
        student = task.build_student(cfg, targets, device)
        test = task.test_set(cfg, targets, log)
        val = validation_set(cfg, targets, test)
        watch_content(val, None, cfg.loader_workers)
        if any(d is not None and is_lazy(d.x) for d in (targets.data, test, val)):
            note = workers_note(cfg.loader_workers)  # once: three datasets share the setting
            if note:
                log(note)
        held, absent = check_bias_options(cfg, targets.data, targets.num_classes, log)
        best = task.best_epoch() if val is not None else None
        history = fit_student(cfg, student, targets, test, device, log, progress, ranks, val, best)
        result = None
        if ranks.main:
            result = finish_run(
                cfg,
                student,
                targets,
                test,
                held,
                absent,
                history,
                device,
                t_start,
                log,
                ranks,
                val,
                best,
            )
        return broadcast(ranks, result)


def validation_set(
    cfg: StudentConfig, targets: SoftTargets, test: Dataset | None
) -> Dataset | None:
    """``--val``: the labeled set that chooses the student's epoch, checked to be held out.

    Choosing on rows the student trains on, or on the test set it is reported on, would make the
    reported error optimistic; both are refused, naming how many samples are shared.

    Raises:
        DatasetError: unlabeled, of another shape or class count, or not disjoint.
        ConfigError: it shares samples with the transfer set or the test set.
    """
    if not cfg.val:
        return None
    val = targets.task.val_set(cfg.val, targets, cfg.data_dir)
    problems = []
    for other, what, fix in (
        (
            targets.data,
            "transfer set",
            "carve both from one split with holdout=F, part=holdout "
            "for --val and the rest for the cache's dataset",
        ),
        (test, "test set", "never choose the epoch on the test set"),
    ):
        shared = shared_samples(val, other)
        if shared:
            problems.append(
                f"--val {val.spec} shares {shared} sample(s) with the {what} {other.spec}; {fix}"
            )
    if problems:
        raise ConfigError(problems)
    return val


# ------------------------------------------------------------------------------------------- 3. fit
def fit_student(
    cfg: StudentConfig,
    student: KDModel,
    targets: SoftTargets,
    test: Dataset | None,
    device: torch.device,
    log: Callable[[str], None],
    progress: bool,
    ranks: Ranks = SINGLE,
    val: Dataset | None = None,
    best: BestEpoch | None = None,
) -> list[dict]:
    """Record ``config.json`` in the run directory, then train with :func:`pipeline.training.fit`.

    With ``val`` (and ``best``), the validation errors and NLL are measured after every epoch and
    the student ends with the weights of its best epoch on them.

    Under torchrun only rank 0 touches the run directory and measures the test set after each
    epoch; with ``KD_RECORD_ROWS=DIR`` set, each rank saves the rows it trained on per epoch in
    DIR (a debugging hook: :class:`pipeline.distributed.RowRecorder`).

    Returns:
        The per-epoch history (also in ``history.csv``), with the test errors after each epoch.
    """
    task = targets.task
    loss = task.loss(cfg)
    out = Path(cfg.out)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        # A run being replaced loses its results now, not before: a failure before training keeps
        # it, and an interrupted retraining never leaves them beside the new config.json.
        for name in ("metrics.json", "student.pt"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "hf", ignore_errors=True)  # an hf:DIR student's export
        atomic_write_json(out / "config.json", run_config(cfg, ranks))
        # Its replayable twin (train-student --config OUT/config.toml); --overwrite is how this
        # invocation treated --out, not part of the run (config.json leaves it out too).
        write_run_file(out, replace(cfg, overwrite=False))
    source = targets.source
    if os.environ.get(RECORD_ROWS_VAR):
        source = RowRecorder(source, os.environ[RECORD_ROWS_VAR], ranks.rank)

    def evaluate(m: torch.nn.Module) -> dict:
        # Measured on rank 0 only; the test set for the history only: nothing is chosen on it.
        return task.epoch_metrics(m, val, test, device) if ranks.main else {}

    on = f"{describe_device(device)}, {targets.describe}"
    if ranks.distributed:
        on = (
            f"{ranks.world} processes ({ranks.backend}; batch {cfg.train.batch_size} each, "
            f"{cfg.train.batch_size * ranks.world} in all) on {on}"
        )
    log(
        f"training {cfg.student} on {targets.source.num_rows} {task.unit(targets.data)}: "
        f"loss={cfg.loss} T={cfg.temperature} alpha={cfg.alpha} ensemble={cfg.ensemble} on {on}"
    )
    return fit(
        task.trainable(student, targets.data),
        source,
        loss,
        cfg.train,
        device,
        teacher_fn=targets.teacher_fn,
        augment=targets.augment,
        evaluate=evaluate,
        history_csv=out / "history.csv" if ranks.main else None,
        log=log,
        desc="student",
        progress=progress,
        ranks=ranks,
        keep_best=best,
        config=run_config(cfg, ranks),
    )


# ---------------------------------------------------------------------------------------- 4. finish
def finish_run(
    cfg: StudentConfig,
    student: KDModel,
    targets: SoftTargets,
    test: Dataset | None,
    held: Dataset | None,
    absent: list[int],
    history: list[dict],
    device: torch.device,
    t_start: float,
    log: Callable[[str], None],
    ranks: Ranks = SINGLE,
    val: Dataset | None = None,
    best: BestEpoch | None = None,
) -> dict:
    """Correct the biases, measure, and complete the run directory: student.pt, then metrics.json.

    With ``val``, ``metrics.selection`` records the chosen epoch and its validation figures, and
    every measurement (test, bias fitting, agreement) is of that epoch's weights.

    ``metrics.json`` is written last and atomically: a run directory with one is a finished run
    (sweeps and experiments resume on it).

    Returns:
        What ``metrics.json`` holds: the soft targets' provenance, ``metrics`` and the ``config``.
    """
    out = Path(cfg.out)
    data, num_classes = targets.data, targets.num_classes
    task = targets.task
    metrics: dict = {"dataset": data.spec}
    if best is not None and val is not None:
        metrics["selection"] = {"on": val.spec, **best.record(len(history))}
        log(task.describe_selection(best, len(history), val))
    metrics.update(task.final_metrics(student, cfg, targets, test, held, absent, device, log))
    metrics["train_seconds"] = sum(r["seconds"] for r in history)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    metrics["epochs"] = len(history)
    metrics["final_epoch"] = history[-1]
    if ranks.distributed:
        metrics["distributed"] = {
            **run_config(cfg, ranks)["distributed"],
            "steps_per_epoch": len(targets.source),
        }
    meta = {
        "model_spec": cfg.student,
        "in_shape": list(data.sample_shape),
        "num_classes": num_classes,
        **task.checkpoint_meta(targets),
        "config": run_config(cfg, ranks),
        **targets.record,
        "metrics": metrics.get("test"),
        "device": describe_device(device),
    }
    save_checkpoint(out / "student.pt", student, meta)
    task.save_outputs(student, targets, out)
    result = {**targets.record, "metrics": metrics, "config": run_config(cfg, ranks)}
    atomic_write_json(out / "metrics.json", result)
    if test is not None:
        log(task.describe_result(metrics["test"], test))
    return result
