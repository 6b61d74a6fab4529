"""Classification metrics computed from logits, and batched inference to get them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.ensemble import combine_members

ECE_BINS = 15


def percent(rate: float, digits: int = 2) -> str:
    """An accuracy or error rate as people read it: ``0.8856`` -> ``"88.56 %"``.

    The one printed form of a rate (terminal, reports, README); files keep the fraction.
    """
    return "n/a" if rate != rate else f"{100 * rate:.{digits}f} %"


def teacher_result_line(summary: dict) -> str:
    """A trained ensemble's test result from its ``ensemble.json`` summary, as ``train-teacher``
    prints it (also under ``--quiet``); "" when it was not evaluated."""
    test = summary.get("test") or {}
    if "ensemble" in test:
        e = test["ensemble"]
        return (
            f"ensemble of {len(summary['members'])}: {e['errors']} test errors "
            f"({percent(e['accuracy'])} accuracy) on {test['dataset']}"
        )
    members = [m for m in test.get("members") or [] if m]  # language models: per member
    if not members:
        return ""
    return "members' test perplexity: " + ", ".join(f"{m['perplexity']:.3f}" for m in members)


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> dict:
    """Test errors, accuracy, NLL, expected calibration error and per-class errors.

    Args:
        logits: (N, C) model logits (T = 1).
        labels: (N,) int64 true classes.
        num_classes: C for the per-class table (defaults to logits' width).
        teacher_logits: optional (N, C) logits to report argmax agreement with.

    Returns:
        JSON-able dict: ``n``, ``errors`` (count), ``accuracy``, ``nll`` (mean, nats), ``ece`` (15
        equal-width confidence bins), ``per_class_errors`` (list of counts), ``per_class_n``, and
        ``teacher_agreement``.
    """
    logits = logits.float()
    labels = labels.long()
    n = int(labels.shape[0])
    c = num_classes or int(logits.shape[1])
    logp = torch.log_softmax(logits, dim=1)
    pred = logp.argmax(dim=1)
    wrong = pred != labels
    nll = float(-logp.gather(1, labels[:, None]).mean()) if n else float("nan")
    conf = logp.max(dim=1).values.exp()
    ece = 0.0
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            acc = (~wrong[in_bin]).float().mean()
            ece += float(in_bin.float().mean() * (conf[in_bin].mean() - acc).abs())
    per_class_errors = np.bincount(labels[wrong].numpy(), minlength=c).tolist()
    out = {
        "n": n,
        "errors": int(wrong.sum()),
        "accuracy": float(1.0 - wrong.float().mean()) if n else float("nan"),
        "nll": nll,
        "ece": ece,
        "per_class_errors": per_class_errors,
        "per_class_n": np.bincount(labels.numpy(), minlength=c).tolist(),
    }
    if teacher_logits is not None:
        out["teacher_agreement"] = float((teacher_logits.argmax(dim=1) == pred).float().mean())
    return out


@torch.inference_mode()
def predict_logits(
    model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Run ``model`` over raw inputs in batches.

    The one batched-inference loop: evaluation, teacher caching and the bench all use it, so a cache
    holds exactly what evaluating the same checkpoint computes (same batch boundaries, same ops).

    Args:
        model: maps raw inputs (B, *shape) to logits (B, C).
        x: (N, *shape) raw inputs (uint8 stays uint8 until on the device: 4x fewer bytes to copy).
        device: where to run.
        batch_size: rows per forward pass.

    Returns:
        (N, C) float32 logits on the CPU.
    """
    was_training = model.training
    model.eval()
    pin = (
        device.type == "cuda"
    )  # pinned host memory lets the copy overlap the previous batch's compute
    outs = []
    for start in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
        if pin:
            xb = xb.pin_memory()
        outs.append(model(xb.to(device, non_blocking=pin)).float())
    model.train(was_training)
    return torch.cat(outs).cpu() if outs else torch.empty(0, 0)


def evaluate_ensemble(
    models: list[nn.Module],
    x: np.ndarray,
    y: np.ndarray,
    device: torch.device,
    num_classes: int,
    method: str = "mean-probs",
    batch_size: int = 1024,
) -> dict:
    """Metrics of each member and of their combination (T = 1) on labeled data.

    Args:
        models: members, each mapping raw inputs (B, *shape) to logits (B, C).
        x: (N, *shape) raw inputs. y: (N,) labels.
        method: how members are combined (see :func:`pipeline.ensemble.combine_members`).

    Returns:
        ``{"members": [metrics, ...], "ensemble": metrics}``; one member gives
        ensemble == members[0].
    """
    labels = torch.as_tensor(y).long()
    member_logits = [predict_logits(m, x, device, batch_size) for m in models]
    members = [classification_metrics(lg, labels, num_classes) for lg in member_logits]
    combined = combine_members(torch.stack(member_logits), method, 1.0)
    return {
        "members": members,
        "ensemble": classification_metrics(combined, labels, num_classes),
        "method": method,
    }
