"""``kd-pipeline train-teacher``: train an ensemble, one seed per member, one checkpoint per
member."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.checkpoints import save_checkpoint
from pipeline.datasets import load_dataset, resolve_eval_set
from pipeline.devices import describe_device, resolve_device
from pipeline.errors import KDError
from pipeline.files import atomic_write_json
from pipeline.metrics import (
    classification_metrics,
    evaluate_ensemble,
    percent,
    predict_logits,
    teacher_result_line,
)
from pipeline.models import build_model
from pipeline.training.config import TeacherConfig
from pipeline.training.loop import fit
from pipeline.training.losses import DistillationLoss
from pipeline.training.sequence import is_sequence_spec, train_sequence_teacher
from pipeline.training.sources import InMemorySource, random_shift
from pipeline.training.train_config import TrainConfig


def train_teacher(
    cfg: TeacherConfig, log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Train ``cfg.members`` teachers and write ``member-<i>.pt`` + ``ensemble.json`` under
    ``cfg.out``.

    Args:
        cfg: what to train.
        log: receives the run's lines (per epoch, per member, the ensemble's result).
        progress: a bar per epoch on a terminal, progress lines in a long epoch elsewhere.

    Returns:
        The ensemble summary written to ``ensemble.json`` (members' and ensemble test metrics).
    """
    cfg.validate()
    if is_sequence_spec(cfg.dataset):  # language models: next-token cross-entropy per position
        return train_sequence_teacher(cfg, log, progress)
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, cfg.data_dir)
    if not train.labeled:
        raise KDError(
            f"{cfg.dataset} has no labels; a teacher needs a labeled dataset "
            "(e.g. fashion-mnist:train)"
        )
    test = resolve_eval_set(cfg.eval, train, cfg.data_dir, log=log)
    spec = cfg.model_spec()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    loss = DistillationLoss(temperature=1.0, alpha=0.0)  # hard labels only
    augment = (
        (lambda x: random_shift(x, cfg.jitter))
        if cfg.jitter and len(train.sample_shape) == 3
        else None
    )
    log(
        f"training {cfg.members} x {spec} on {train.spec} (n={len(train)}) "
        f"on {describe_device(device)}"
    )
    models, paths = [], []
    t_start = time.perf_counter()
    for i in range(cfg.members):
        seed = cfg.train.seed + i
        torch.manual_seed(seed)
        model = build_model(spec, train.sample_shape, train.num_classes, train.input_stats).to(
            device
        )
        member_cfg = type(cfg.train)(**{**cfg.train.to_dict(), "seed": seed})
        source = InMemorySource(train.x, train.y, batch_size=member_cfg.batch_size, seed=seed)

        def evaluate(m: torch.nn.Module) -> dict:
            if test is None:
                return {}
            met = classification_metrics(
                predict_logits(m, test.x, device), torch.as_tensor(test.y), test.num_classes
            )
            return {"test_errors": met["errors"], "test_accuracy": met["accuracy"]}

        t0 = time.perf_counter()
        history = fit(
            model,
            source,
            loss,
            member_cfg,
            device,
            augment=augment,
            evaluate=evaluate,
            history_csv=out / f"member-{i}.history.csv",
            log=log,
            desc=f"member {i}",
            progress=progress,
            config={**cfg.to_dict(), "member": i, "seed": seed},
        )
        metrics = None
        if test is not None:
            metrics = classification_metrics(
                predict_logits(model, test.x, device), torch.as_tensor(test.y), test.num_classes
            )
            metrics["dataset"] = test.spec
        meta = {
            "model_spec": spec,
            "in_shape": list(train.sample_shape),
            "num_classes": train.num_classes,
            "class_names": train.class_names,
            "dataset": {"spec": train.spec, "fingerprint": train.fingerprint},
            "config": {**cfg.to_dict(), "member": i, "seed": seed},
            "metrics": metrics,
            "train_seconds": time.perf_counter() - t0,
            "device": describe_device(device),
            "final_epoch": history[-1] if history else None,
        }
        paths.append(save_checkpoint(out / f"member-{i}.pt", model, meta))
        models.append(model)
        if metrics:
            log(
                f"member {i}: {metrics['errors']} test errors "
                f"({percent(metrics['accuracy'])} accuracy)"
            )
    summary = {
        "members": [str(p.name) for p in paths],
        "model_spec": spec,
        "dataset": train.spec,
        "train_seconds": time.perf_counter() - t_start,
        "config": cfg.to_dict(),
    }
    if test is not None:
        res = evaluate_ensemble(models, test.x, test.y, device, test.num_classes)
        summary["test"] = {"dataset": test.spec, **res}
        log(teacher_result_line(summary))
    # Last and atomically: reuse (``recorded_config``) takes a readable ensemble.json as finished.
    atomic_write_json(out / "ensemble.json", summary)
    return summary


def recorded_config(out: str | Path) -> TeacherConfig | None:
    """The config a finished ensemble directory was trained with (from its ``ensemble.json``), or
    None when there is none or it cannot be read."""
    try:
        d = json.loads((Path(out) / "ensemble.json").read_text())["config"]
        return TeacherConfig(**{**d, "train": TrainConfig(**d["train"])})
    except (OSError, ValueError, KeyError, TypeError):
        return None
