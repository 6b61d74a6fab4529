"""The paper's losses behind one signature, a registry (ensembles: :mod:`pipeline.ensemble`).

Every loss is called as ``loss(student_logits, teacher_logits, labels) -> dict`` with
``student_logits`` (B, C), ``teacher_logits`` (B, C) or None, ``labels`` (B,) int64 or None, and
returns ``{"loss": total, "soft": ..., "hard": ...}`` (scalars; parts that do not apply are 0). The
training loop back-propagates ``"loss"`` and logs every part, so a new loss is a new registry entry,
never a new loop.

Distillation (Hinton et al. 2015, section 2)::

    loss = alpha * T^2 * KL(softmax(v/T) || softmax(z/T)) + (1 - alpha) * CE(y, softmax(z))

``v`` the teacher's logits, ``z`` the student's; ``alpha`` weights the soft term (the paper uses a
high weight). The T^2 factor keeps the soft gradients' magnitude independent of T:
d(T^2 KL)/dz = T (q - p) per sample. Logit matching is the high-temperature limit: for zero-mean
logits T^2 KL -> (1 / 2C) * sum_i (z_i - v_i)^2, which is ``logit-mse``'s soft term (it removes
each row's mean first, which softmax ignores anyway).

Sparse soft targets (a cache's ``topk:K`` or ``sampled:S`` members,
:mod:`pipeline.training.targets`) take the same signature: ``kd`` becomes the (K+1)-bucket KL
(top-k: the student's softmax collapsed onto the kept classes and one tail bucket) or the unbiased
importance-sampled estimate (sampled), with the same T^2; ``logit-mse`` matches the kept logits
only.

All maths runs in float32 on log-probabilities (``log_softmax`` + ``kl_div(log_target=True)``), so
logits of magnitude 1e4 give finite losses and gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.cache.kinds import STORAGE_KINDS
from pipeline.checks import collect, in_range, positive
from pipeline.ensemble import ENSEMBLE_METHODS, combine_members  # noqa: F401  (their old home)
from pipeline.errors import ConfigError
from pipeline.registry import Registry
from pipeline.training.targets import SparseTargets, kept_logit_mse, sparse_kl


def _config_error(message: str) -> ConfigError:
    return ConfigError([message])


#: Loss names -> their classes, called as ``cls(temperature=T, alpha=a)``; plug-ins from the entry
#: point group ``kd_pipeline.losses``.
LOSSES: Registry[Callable[..., DistillationLoss]] = Registry("losses", "loss", _config_error)


def softmax_t(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at temperature T: q_i = exp(z_i/T) / sum_j exp(z_j/T).

    Shapes (..., C) -> (..., C).
    """
    return torch.softmax(logits.float() / temperature, dim=-1)


def _hard_term(
    student_logits: torch.Tensor, labels: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    if alpha >= 1.0:
        return student_logits.new_zeros((), dtype=torch.float32)
    if labels is None:
        raise ConfigError(
            [
                f"alpha={alpha} < 1 needs hard labels, but this batch has none; use --alpha 1 on "
                "an unlabeled transfer set"
            ]
        )
    return F.cross_entropy(student_logits.float(), labels)


@LOSSES.register("kd", "the paper's loss: alpha T^2 KL(p_T || q_T) + (1 - alpha) CE")
class DistillationLoss:
    """``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)`` (the paper's loss; alpha = soft
    weight).

    With ``alpha = 0`` it is plain cross-entropy and needs no teacher.
    """

    name = "kd"

    def __init__(self, temperature: float = 1.0, alpha: float = 0.9) -> None:
        problems = collect(positive("temperature", temperature), in_range("alpha", alpha, 0, 1))
        if problems:
            raise ConfigError(problems)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def soft_term(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTargets
    ) -> torch.Tensor:
        """T^2 * KL(softmax(v/T) || softmax(z/T)), averaged over the batch.

        (B, C), (B, C) or sparse targets of B rows -> scalar.
        """
        t = self.temperature
        if isinstance(teacher_logits, SparseTargets):
            return (t * t) * sparse_kl(student_logits, teacher_logits, t).mean()
        log_q = torch.log_softmax(student_logits.float() / t, dim=-1)
        log_p = torch.log_softmax(teacher_logits.float() / t, dim=-1)
        return (t * t) * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTargets | None,
        labels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        zero = student_logits.new_zeros((), dtype=torch.float32)
        if self.alpha > 0:
            if teacher_logits is None:
                raise ConfigError(
                    [f"alpha={self.alpha} > 0 needs teacher logits (a cache or an online teacher)"]
                )
            soft = self.soft_term(student_logits, teacher_logits)
        else:
            soft = zero
        hard = _hard_term(student_logits, labels, self.alpha)
        return {"loss": self.alpha * soft + (1.0 - self.alpha) * hard, "soft": soft, "hard": hard}


@LOSSES.register("logit-mse", "logit matching (the high-temperature limit) + (1 - alpha) CE")
class LogitMatchingLoss(DistillationLoss):
    """``alpha * (1 / 2C) * sum_i (z'_i - v'_i)^2 + (1 - alpha) * CE`` — logit matching, the high-T
    limit.

    ``z'`` and ``v'`` are the logits with each row's mean removed: softmax ignores a per-row shift,
    so the shift carries no knowledge, and the paper's limit assumes zero-mean logits. (Combined
    ensemble targets such as ``mean-probs`` are ``T log(mean p)``, shifted by about ``-T log C``;
    matching raw values would spend the loss on that shift.) The temperature is accepted (one
    signature) but does not enter.
    """

    name = "logit-mse"

    def soft_term(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | SparseTargets
    ) -> torch.Tensor:
        if isinstance(teacher_logits, SparseTargets):
            if STORAGE_KINDS[teacher_logits.kind].WEIGHTED:
                raise ConfigError(
                    [
                        "--loss logit-mse needs a dense or topk cache: sampled rows hold a few "
                        "drawn classes' logits, which say nothing unbiased about the others"
                    ]
                )
            return kept_logit_mse(student_logits, teacher_logits)
        z, v = student_logits.float(), teacher_logits.float()
        diff = (z - z.mean(dim=-1, keepdim=True)) - (v - v.mean(dim=-1, keepdim=True))
        return 0.5 * diff.pow(2).mean(dim=-1).mean()


def make_loss(name: str, temperature: float, alpha: float) -> DistillationLoss:
    """Build a registered loss by name (``kd`` or ``logit-mse``)."""
    return LOSSES.get(name)(temperature=temperature, alpha=alpha)
