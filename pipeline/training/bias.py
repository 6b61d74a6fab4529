"""Output-bias correction for students of transfer sets that omit classes (the paper's
"increase the bias of the omitted class", fitted on held-out data), and the held-out checks it
needs (:func:`shared_samples`: how many samples two datasets share).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.datasets import (
    Dataset,
    load_eval_dataset,
    parse_spec,
)
from pipeline.errors import ConfigError
from pipeline.metrics import classification_metrics, predict_logits
from pipeline.models import KDModel
from pipeline.training.config import StudentConfig

BIAS_GRID = np.round(np.arange(-5.0, 15.0001, 0.1), 4)


def shared_samples(a: Dataset, b: Dataset | None) -> int:
    """How many samples two datasets share: ids of the same split of the same files (0 when they
    come from different splits or files, whose ids are not comparable)."""
    if b is None or a.source != b.source or _split(a.spec) != _split(b.spec):
        return 0
    return int(np.intersect1d(np.asarray(a.ids), np.asarray(b.ids)).size)


def _split(spec: str) -> tuple:
    """A spec without its modifiers: which split of which source (``fashion-mnist``, ``train``)."""
    source, args, _ = parse_spec(spec)
    return source.name, tuple(args)


# ----------------------------------------------------------------------------- bias correction
def absent_classes(dataset_meta: dict, num_classes: int, labels: np.ndarray | None) -> list[int]:
    """Classes missing from a transfer set: excluded / not kept by its modifiers, or with no labeled
    rows."""
    mods = dataset_meta.get("modifiers") or {}
    if "exclude" in mods:
        return sorted(mods["exclude"])
    if "keep" in mods:
        return sorted(set(range(num_classes)) - set(mods["keep"]))
    if labels is not None:
        return [int(c) for c in np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)]
    return []


def fit_class_bias(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[int]
) -> dict[int, float]:
    """Per-class logit offsets for ``classes`` that minimise errors on held-out labeled data.

    Coordinate search over a grid (-5 .. +15 step 0.1), two sweeps; ties go to the lower NLL. This
    is the paper's "increase the bias of the omitted class" chosen on held-out data rather than by
    hand.

    Args:
        logits: (N, C) student logits on the held-out set, before correction.
        labels: (N,) labels.
    """
    offsets = {c: 0.0 for c in classes}
    for _ in range(2):
        for c in classes:
            best = None
            for delta in BIAS_GRID:
                shifted = logits.clone()
                for k, v in offsets.items():
                    shifted[:, k] += float(delta) if k == c else v
                errors = int((shifted.argmax(1) != labels).sum())
                nll = float(torch.nn.functional.cross_entropy(shifted, labels))
                key = (errors, nll)
                if best is None or key < best[0]:
                    best = (key, float(delta))
            offsets[c] = best[1]
    return offsets


def check_bias_options(
    cfg: StudentConfig, data: Dataset, num_classes: int, log: Callable[[str], None] = print
) -> tuple[Dataset | None, list[int]]:
    """Validate the bias options before training (a bad one must not cost a whole run).

    Returns:
        The held-out set for ``--fit-bias-on`` (or None) and the classes absent from the transfer
        set.
    """
    bad = [
        f"--class-bias {c}={d}: class out of range 0..{num_classes - 1}"
        for c, d in cfg.class_bias.items()
        if not 0 <= c < num_classes
    ]
    if bad:
        raise ConfigError(bad)
    if not cfg.fit_bias_on:
        return None, []
    held = load_eval_dataset(cfg.fit_bias_on, cfg.data_dir, data, num_classes)
    absent = absent_classes(data.describe(), num_classes, data.y)
    if not absent:
        raise ConfigError(
            [
                f"--fit-bias-on: no class is absent from the transfer set {data.spec}; bias "
                "fitting is for transfer sets made with exclude= or keep="
            ]
        )
    # Rows the student trains on are not held out (its overconfidence there biases the fit).
    overlap = shared_samples(held, data)
    if overlap:
        log(
            f"warning: {overlap} of the {len(held)} rows of --fit-bias-on {held.spec} are in "
            f"the transfer set {data.spec}; set rows aside with holdout=F (e.g. transfer "
            "...:holdout=0.1:exclude=3, held-out ...:holdout=0.1:part=holdout)"
        )
    return held, absent


def apply_bias(
    student: KDModel,
    cfg: StudentConfig,
    held: Dataset | None,
    absent: list[int],
    num_classes: int,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """Fit offsets for the absent classes on the held-out set (if any), then add the
    ``--class-bias`` offsets."""
    rec: dict = {"manual": {str(k): v for k, v in cfg.class_bias.items()}}
    if held is not None:
        logits = predict_logits(student, held.x, device)
        labels = torch.as_tensor(held.y)
        before = classification_metrics(logits, labels, num_classes)
        offsets = fit_class_bias(logits - student.output_bias.cpu(), labels, absent)
        for c, v in offsets.items():
            student.output_bias[c] = v
        after = classification_metrics(predict_logits(student, held.x, device), labels, num_classes)
        rec["fitted"] = {
            "on": held.spec,
            "classes": absent,
            "offsets": {str(k): v for k, v in offsets.items()},
            "errors_before": before["errors"],
            "errors_after": after["errors"],
            "class_errors_before": {str(c): before["per_class_errors"][c] for c in absent},
            "class_errors_after": {str(c): after["per_class_errors"][c] for c in absent},
        }
        log(
            f"fitted bias offsets {offsets} on {held.spec}: "
            f"errors {before['errors']} -> {after['errors']}"
        )
    for c, delta in cfg.class_bias.items():
        student.output_bias[c] += delta
    rec["output_bias"] = student.output_bias.cpu().tolist()
    return rec
