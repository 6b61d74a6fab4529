"""Stage two for classifiers: the soft targets a student is trained on (:class:`SoftTargets`),
building and checking the student (:func:`build_student`), and :class:`ClassificationTask`, what
the recipe does for image (or any row) classifiers (:data:`CLASSIFICATION`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.read import LogitCache
from pipeline.data.stream import watch_content
from pipeline.datasets import (
    Dataset,
    load_eval_dataset,
    resolve_eval_set,
)
from pipeline.errors import ConfigError, KDError, ModelSpecError
from pipeline.metrics import classification_metrics, percent, predict_logits
from pipeline.models import KDModel, build_model
from pipeline.training.bias import apply_bias
from pipeline.training.config import StudentConfig
from pipeline.training.fit_callbacks import BestEpoch
from pipeline.training.loader import (
    StreamingCacheSource,
    shard_targets,
)
from pipeline.training.losses import make_loss
from pipeline.training.sources import InMemorySource
from pipeline.training.targets import SparseTargets
from pipeline.training.views import shard_inputs, view_use


@dataclass
class SoftTargets:
    """Where a student's soft targets come from, set up and checked (step 1 of a student's recipe).

    Attributes:
        data: the transfer set (the cache's recorded dataset, or an online teacher's ``--dataset``).
        num_classes: the teacher's classes; class_names: their names.
        input_stats: the inputs' mean and std, for the student's normalisation (caches record them).
        source: the batches ``fit`` trains on (with cached soft targets, or inputs and labels only).
        teacher_fn: online teacher: inputs (B, *shape) -> combined logits (B, C); None for a cache.
        record: provenance for metrics.json and the checkpoint: ``{"cache": {...}}`` or
            ``{"online_teacher": {...}}``.
        cache, members: the cache and the member indices used (None for an online teacher).
        describe: how the soft targets arrive, for the log ("memory loader", "online teacher").
    """

    data: Dataset
    num_classes: int
    class_names: list[str]
    input_stats: tuple[float, float]
    source: InMemorySource | StreamingCacheSource
    teacher_fn: Callable[[torch.Tensor], torch.Tensor] | None
    record: dict
    cache: LogitCache | None = None
    members: list[int] | None = None
    describe: str = ""
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # live augmentation (--augment)
    # How students of these targets are built, trained and measured: image classification, or
    # token sequences (pipeline.training.sequence.SequenceTask). The recipe is the same.
    task: Any = None
    teacher: torch.nn.Module | None = None  # the teacher itself when at hand (test agreement)

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = CLASSIFICATION


# --------------------------------------------------------------- the student (step 2 of the recipe)
def build_student(cfg: StudentConfig, targets: SoftTargets, device: torch.device) -> KDModel:
    """The student (seeded), checked to output one logit per teacher class.

    Raises:
        ConfigError: the student's network has another output width.
    """
    torch.manual_seed(cfg.train.seed)
    data, num_classes = targets.data, targets.num_classes
    shape = data.sample_shape
    # A user's spec can fail in any way (a factory with another signature, a file that is not
    # TorchScript, a network for other inputs): whatever it raises is reported as one error
    # about the spec, before training, not as a traceback from inside the loop.
    try:
        student = build_model(cfg.student, shape, num_classes, targets.input_stats)
    except KDError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: anything may come out of it
        raise ModelSpecError(
            f"student {cfg.student}: cannot be built for inputs of shape "
            f"{shape} and {num_classes} classes ({type(e).__name__}: {e})"
        ) from e
    student = student.to(device)
    # Probe the network itself on one batch of the dataset's shape: KDModel's forward adds an
    # (num_classes,) output bias, which broadcasts a 1-wide output to num_classes and turns any
    # other wrong width into a bare RuntimeError. Eval mode: the probe must not update batch-norm
    # statistics.
    student.eval()
    try:
        with torch.no_grad():
            xb = torch.as_tensor(data.x[:2]).to(device).float()
            logits = student.body((xb - student.input_mean) / student.input_std)
    except Exception as e:  # noqa: BLE001 - user code: anything may come out of it
        raise ModelSpecError(
            f"student {cfg.student} fails on a batch of inputs of shape "
            f"{tuple(xb.shape)} (the transfer set's samples are {shape}): "
            f"{type(e).__name__}: {e}; build the network for in_shape={shape}"
        ) from e
    student.train()
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(xb):
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelSpecError(
            f"student {cfg.student} returns {found} for a batch of shape "
            f"{tuple(xb.shape)}; expected logits of shape ({len(xb)}, "
            f"{num_classes})"
        )
    width = logits.shape[-1]
    if width != num_classes:
        raise ConfigError(
            [
                f"student {cfg.student} outputs {width} logits but the teacher has "
                f"{num_classes} classes; build the student for the cache's classes"
            ]
        )
    return student


class ClassificationTask:
    """What stage two does for image (or any row) classifiers: the student maps an input to C
    logits, is measured by test errors, NLL and ECE (and agreement with the cached teacher), may
    have its output biases corrected, and ``--val`` chooses the epoch by validation errors (ties
    by NLL). :class:`pipeline.training.sequence.SequenceTask` is the same interface for tokens.
    """

    name = "classification"

    def refused(self, cfg: StudentConfig) -> list[str]:
        return []  # every StudentConfig option applies to classifiers

    def unit(self, data: Dataset) -> str:
        return "rows"

    def build_student(
        self, cfg: StudentConfig, targets: SoftTargets, device: torch.device
    ) -> KDModel:
        return build_student(cfg, targets, device)

    def trainable(self, student: torch.nn.Module, data: Dataset) -> torch.nn.Module:
        return student

    def loss(self, cfg: StudentConfig) -> Callable:
        return make_loss(cfg.loss, cfg.temperature, cfg.alpha)

    def test_set(
        self, cfg: StudentConfig, targets: SoftTargets, log: Callable[[str], None]
    ) -> Dataset | None:
        test = resolve_eval_set(cfg.eval, targets.data, cfg.data_dir, targets.num_classes, log=log)
        watch_content(test, None, cfg.loader_workers)
        return test

    def val_set(self, spec: str, targets: SoftTargets, data_dir: str | None) -> Dataset:
        return load_eval_dataset(spec, data_dir, targets.data, targets.num_classes)

    def best_epoch(self) -> BestEpoch:
        return BestEpoch()

    def epoch_metrics(
        self, m: torch.nn.Module, val: Dataset | None, test: Dataset | None, device: torch.device
    ) -> dict:
        row: dict = {}
        if val is not None:
            logits = predict_logits(m, val.x, device)
            labels = torch.as_tensor(val.y)
            wrong = int((logits.argmax(1) != labels).sum())
            nll = float(torch.nn.functional.cross_entropy(logits.float(), labels))
            row.update(val_errors=wrong, val_error_rate=wrong / len(val), val_nll=nll)
        if test is not None:
            logits = predict_logits(m, test.x, device)
            wrong = int((logits.argmax(1) != torch.as_tensor(test.y)).sum())
            row.update(test_errors=wrong, test_error_rate=wrong / len(test))
        return row

    def final_metrics(
        self,
        student: KDModel,
        cfg: StudentConfig,
        targets: SoftTargets,
        test: Dataset | None,
        held: Dataset | None,
        absent: list[int],
        device: torch.device,
        log: Callable[[str], None],
    ) -> dict:
        """Bias correction, then the test metrics and the agreement with the cached teacher."""
        out: dict = {}

        def test_metrics() -> dict:
            return classification_metrics(
                predict_logits(student, test.x, device),
                torch.as_tensor(test.y),
                targets.num_classes,
            )

        if test is not None and (cfg.class_bias or cfg.fit_bias_on):
            out["test_before_bias"] = test_metrics()
        bias_record = apply_bias(student, cfg, held, absent, targets.num_classes, device, log)
        if test is not None:
            out["test"] = {"dataset": test.spec, **test_metrics()}
        if targets.cache is not None:
            out["teacher_agreement_transfer"] = _transfer_agreement(
                student, targets.cache, targets.data, targets.members, cfg, device
            )
        out["bias"] = bias_record
        return out

    def describe_selection(self, best: BestEpoch, epochs: int, val: Dataset) -> str:
        return (
            f"kept epoch {best.epoch} of {epochs}: {best.row['val_errors']} errors on "
            f"--val {val.spec} (NLL {best.row['val_nll']:.4f})"
        )

    def describe_result(self, t: dict, test: Dataset) -> str:
        return (
            f"student: {t['errors']} test errors ({percent(t['accuracy'])} accuracy, "
            f"NLL {t['nll']:.4f}, ECE {t['ece']:.4f}) on {test.spec}"
        )

    def save_outputs(self, student: torch.nn.Module, targets: SoftTargets, out: Path) -> None:
        """Nothing beside ``student.pt`` for classifiers."""

    def checkpoint_meta(self, targets: SoftTargets) -> dict:
        data = targets.data
        return {
            "class_names": targets.class_names,
            "dataset": {"spec": data.spec, "fingerprint": data.fingerprint},
        }


CLASSIFICATION = ClassificationTask()


@torch.inference_mode()
def _transfer_agreement(
    student: torch.nn.Module,
    cache: LogitCache,
    data: Dataset,
    members: list[int],
    cfg: StudentConfig,
    device: torch.device,
) -> float:
    """Fraction of transfer-set rows where the student's argmax equals the cached ensemble's (shard
    by shard)."""
    same = total = 0
    plan = view_use(cfg, cache).plan  # a view cache: compared on view 0, replayed
    for s in cache.done_shards(members):
        start, stop = cache.shard_bounds(int(s))
        teacher = shard_targets(cache, int(s), members, cfg.ensemble, cfg.temperature)
        top = teacher.top_class() if isinstance(teacher, SparseTargets) else teacher.argmax(1)
        x, rows = shard_inputs(cache, plan, int(s), data.x[start:stop])
        top = top[rows]
        pred = predict_logits(student, x, device)
        same += int((pred.argmax(1) == top).sum())
        total += stop - start
    return same / total if total else float("nan")
