"""The paper's distillation loss as one function, for training loops other than kd-pipeline's.

:func:`kd_loss` is exactly what ``train-student`` minimises (Hinton et al. 2015, section 2)::

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels, q_1)

``p_T`` the teacher's distribution at temperature T (the targets), ``q_T = softmax(z / T)`` the
student's; ``alpha`` weighs the soft term and ``1 - alpha`` the hard-label cross-entropy (at
T = 1), as ``--alpha`` does. The T^2 keeps the soft gradients' size independent of T. It is the
stage-two maths itself (:class:`pipeline.training.losses.DistillationLoss`, and
:class:`pipeline.training.sequence.SequenceLoss` for token rows), not a copy: dense (B, C)
targets, and top-k or sampled :class:`~pipeline.training.targets.SparseTargets` (the (K+1)-bucket
KL, or the unbiased sampled estimate), with the same T^2.
"""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError
from pipeline.training.losses import make_loss
from pipeline.training.sequence import SequenceLoss
from pipeline.training.targets import SparseTargets, flat_rows


def kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor | SparseTargets | None,
    temperature: float = 1.0,
    alpha: float = 0.9,
    labels: torch.Tensor | None = None,
    *,
    loss: str = "kd",
    return_parts: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels, q_1)``, averaged over rows.

    Args:
        student_logits: (B, C) raw student logits, or (B, P, C) for token sequences (one row per
            position).
        targets: a :class:`~pipeline.training.dataset.CacheDataset` batch's ``targets``: (B, C) or
            (B, P, C) teacher logits ``v`` (soft targets ``softmax(v / T)``), or
            :class:`SparseTargets` (already at the dataset's temperature: use the same T here);
            None only with ``alpha = 0`` (plain cross-entropy).
        temperature: T (> 0).
        alpha: weight of the soft term in [0, 1]; 1 - alpha weighs the hard labels.
        labels: (B,) or (B, P) int64 class indices; negative entries (a token without a next
            token, padding) are left out of the hard term, and padding (-101) out of both. Needed
            when alpha < 1.
        loss: ``kd`` (above) or ``logit-mse`` (the high-T limit: squared differences of
            mean-removed logits, in place of T^2 KL).
        return_parts: also return the two terms.

    Returns:
        the scalar loss, or with ``return_parts`` ``{"loss", "soft", "hard"}`` (scalars; a term
        that does not apply is 0).

    Raises:
        ConfigError: T or alpha out of range, alpha < 1 without labels, alpha > 0 without
            targets, or logits whose class count is not the targets'.
    """
    z = student_logits.reshape(-1, student_logits.shape[-1])
    t = flat_rows(targets)
    width = t.num_classes if isinstance(t, SparseTargets) else None if t is None else t.shape[-1]
    if width is not None and width != z.shape[-1]:
        raise ConfigError(
            [
                f"the student's logits have {z.shape[-1]} classes, the targets {width}; a model "
                f"whose head is padded (a language model's) is compared on logits[..., :{width}]"
            ]
        )
    if t is not None and len(t) != z.shape[0]:
        raise ConfigError(
            [f"the student's logits have {z.shape[0]} rows, the targets {len(t)}: not one batch"]
        )
    inner = make_loss(loss, temperature, alpha)
    if labels is None:
        parts = inner(z, t, None)
    else:
        # Token rows' negative labels (no next token, padding) are what SequenceLoss drops; with
        # every label a class it is the classification loss exactly.
        parts = SequenceLoss(inner)(z, t, labels.reshape(-1).long())
    return parts if return_parts else parts["loss"]


__all__ = ["kd_loss"]
