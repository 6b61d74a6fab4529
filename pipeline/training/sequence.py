"""Sequence distillation: teachers and students over token sequences, one loss term per token.

A sequence dataset (:mod:`pipeline.sequences.data`) holds (N, P) token ids and next-token labels;
a sequence model maps (B, P) ids to (B, P, W) logits. Everything here reuses the one training loop
(:func:`pipeline.training.loop.fit`) and the losses on (rows, C): the model is wrapped to return
its logits as rows (B * P, V) (:class:`TokenRowModel`: sequence by sequence, position by position,
padded heads dropped), the batches carry the matching rows of soft targets and the labels flattened
(B * P,), and :class:`SequenceLoss` drops padding before the paper's loss::

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(next token, q_1)    (per token)

Students go through the one stage-two recipe (:func:`pipeline.training.distill.train_student`):
this module gives it the token-specific parts, :class:`SequenceTask` (how a sequence student is
built, trained, measured and chosen) and :func:`token_source` (a token cache's rows in memory or
streamed by shards, shuffled by sequence, a rank's share under torchrun). A cache's rows are the
transfer set's sequences in order, position by position (the row index is checked against that
layout when the cache is read), so grouping a shard's rows P at a time pairs each sequence with its
own rows. Metrics: test perplexity, bits per byte (the test tokens' total NLL in bits over the
bytes of text they stand for), token accuracy and agreement with the teacher's argmax tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.read import LogitCache
from pipeline.checkpoints import load_models, save_checkpoint
from pipeline.datasets import Dataset, default_eval_spec, load_dataset
from pipeline.devices import describe_device, resolve_device
from pipeline.ensemble import combine_members
from pipeline.errors import CacheError, ConfigError, KDError, ModelSpecError
from pipeline.files import atomic_write_json
from pipeline.metrics import percent
from pipeline.models import KDModel, build_model
from pipeline.sequences.data import PAD, SequenceDataset, is_sequence, tokenizer_record
from pipeline.sequences.hf import (
    HFCausalLM,
    export_hf,
    hf_export_dirs,
    student_problems,
    trusted_code,
)
from pipeline.sequences.models import token_rows
from pipeline.training.config import StudentConfig, TeacherConfig
from pipeline.training.fit_callbacks import BestEpoch
from pipeline.training.loader import LoaderPlan, StreamingCacheSource, plan_loader, shard_targets
from pipeline.training.loop import fit
from pipeline.training.losses import DistillationLoss, make_loss
from pipeline.training.sources import InMemorySource
from pipeline.training.targets import SparseTargets, cat_targets, group_rows

SEQUENCE_SOURCES = ("text", "tokens")
EVAL_BATCH = 64  # sequences per forward pass when measuring

Targets = torch.Tensor | SparseTargets


# ------------------------------------------------------------------------------------- the pieces
class TokenRowModel(nn.Module):
    """A sequence model seen as a row model: (B, P) ids -> (B * P, V) logits (real vocabulary)."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_rows(self.model(x), self.vocab)

    @torch.no_grad()
    def constrain(self) -> None:
        fn = getattr(self.model, "constrain", None)
        if fn is not None:
            fn()


class SequenceLoss:
    """The paper's loss per token on rows, with padding dropped (see the module docstring).

    Args:
        inner: the row loss whose soft term is used (``kd`` or ``logit-mse``), with T and alpha.
    """

    def __init__(self, inner: DistillationLoss) -> None:
        self.inner = inner

    @property
    def measures_nll(self) -> bool:
        """Whether the hard term is computed (``alpha < 1``): then it is the mean next-token NLL,
        which the tracking reports with its perplexity."""
        return self.inner.alpha < 1

    def __call__(
        self, logits: torch.Tensor, teacher: Targets | None, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        keep = labels != PAD
        if not bool(keep.all()):
            logits, labels = logits[keep], labels[keep]
            teacher = None if teacher is None else teacher[keep]
        zero = logits.new_zeros((), dtype=torch.float32)
        alpha = self.inner.alpha
        if alpha > 0:
            if teacher is None:
                raise ConfigError([f"alpha={alpha} > 0 needs soft targets (a cache or a teacher)"])
            soft = self.inner.soft_term(logits, teacher)
        else:
            soft = zero
        hard = zero
        labeled = labels >= 0
        if alpha < 1 and bool(labeled.any()):
            hard = F.cross_entropy(logits[labeled].float(), labels[labeled])
        return {"loss": alpha * soft + (1 - alpha) * hard, "soft": soft, "hard": hard}


# ------------------------------------------------------------------------------------- measuring
@torch.inference_mode()
def sequence_metrics(
    model: nn.Module,
    data: SequenceDataset,
    device: torch.device,
    teacher: nn.Module | None = None,
    batch_size: int = EVAL_BATCH,
) -> dict:
    """Next-token metrics of ``model`` on ``data`` (labelled positions only).

    Returns:
        ``tokens``, ``bytes``, ``nll`` (nats per token), ``perplexity``, ``bits_per_token``,
        ``bits_per_byte``, ``accuracy`` and ``errors`` (argmax vs the next token), and with a
        ``teacher`` its ``teacher_agreement`` (argmax tokens equal) and the teacher's own metrics.
    """
    was = model.training
    model.eval()
    v = data.num_classes
    nll = wrong = agree = t_nll = 0.0
    n = 0
    for start in range(0, len(data), batch_size):
        xb = torch.as_tensor(data.x[start : start + batch_size]).to(device)
        y = torch.as_tensor(data.y[start : start + batch_size]).reshape(-1).to(device)
        lab = y >= 0
        z = token_rows(model(xb), v)[lab].float()
        yl = y[lab]
        nll += float(F.cross_entropy(z, yl, reduction="sum"))
        pred = z.argmax(dim=1)
        wrong += float((pred != yl).sum())
        n += int(lab.sum())
        if teacher is not None:
            zt = token_rows(teacher(xb), v)[lab].float()
            t_nll += float(F.cross_entropy(zt, yl, reduction="sum"))
            agree += float((zt.argmax(dim=1) == pred).sum())
    model.train(was)
    n_bytes = data.byte_count(data.y)
    out = _nll_record(nll, n, n_bytes)
    out.update({"errors": int(wrong), "accuracy": 1 - wrong / max(n, 1)})
    if teacher is not None:
        out["teacher_agreement"] = agree / max(n, 1)
        out["teacher"] = _nll_record(t_nll, n, n_bytes)
    return out


def _nll_record(total_nats: float, tokens: int, n_bytes: int) -> dict:
    per = total_nats / max(tokens, 1)
    return {
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": per,
        "perplexity": math.exp(min(per, 700.0)),
        "bits_per_token": per / math.log(2),
        "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
    }


# ------------------------------------------------------------------------------------- detection
def is_sequence_spec(spec: str | None) -> bool:
    """Whether a dataset spec names a sequence source (``text:``, ``tokens:``, or ``hf:`` with a
    ``text=COLUMN`` modifier)."""
    if not spec:
        return False
    kind = spec.partition(":")[0]
    return kind in SEQUENCE_SOURCES or (
        kind == "hf" and any(p.startswith("text=") for p in spec.split(":")[3:])
    )


def _test_set(spec: str | None, train: SequenceDataset, data_dir: str | None) -> Dataset | None:
    """``--eval`` for sequences: the given spec, '' for none, else the training spec's test split;
    refused when its tokenizer differs from the training data's."""
    if spec == "":
        return None
    spec = spec or default_eval_spec(train.spec)
    if spec is None:
        return None
    test = load_dataset(spec, data_dir)
    if not is_sequence(test):
        raise ConfigError([f"--eval {spec} is not a sequence dataset; the models read tokens"])
    check_same_tokenizer(train.tokenizer.describe(), test, "the test set")
    return test


def check_same_tokenizer(want: dict, data: Dataset, what: str, where: str = "") -> None:
    """Refuse ``data`` when its tokenizer is not ``want`` (a record from a cache or checkpoint).

    Raises:
        CacheError: one message naming both tokenizers and what to do.
    """
    have = tokenizer_record(data).get("tokenizer")
    if have is None or have["sha256"] == want.get("sha256"):
        return
    raise CacheError(
        f"tokenizer differs: {where or 'the soft targets were'} made with a {want.get('kind')} "
        f"tokenizer of {want.get('vocab_size')} tokens ({str(want.get('sha256'))[:19]}), but "
        f"{what} {data.spec} uses a {have['kind']} tokenizer of {have['vocab_size']} tokens "
        f"({have['sha256'][:19]}); token ids of different tokenizers mean different text. Use the "
        "same tokenizer (its tokenizer.json: tokenizer=PATH) or re-create the cache"
    )


# -------------------------------------------------------------------------------------- teachers
def train_sequence_teacher(
    cfg: TeacherConfig, log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """``train-teacher`` on a sequence dataset: ``cfg.members`` language models, next-token CE
    (``log`` and ``progress`` as for :func:`~pipeline.training.teacher.train_teacher`).

    Writes ``member-<i>.pt`` (recording the tokenizer) and ``ensemble.json`` under ``cfg.out``.
    """
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, cfg.data_dir)
    if not is_sequence(train):
        raise KDError(f"{cfg.dataset} is not a sequence dataset")
    test = _test_set(cfg.eval, train, cfg.data_dir)
    spec = cfg.model
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    loss = SequenceLoss(DistillationLoss(temperature=1.0, alpha=0.0))
    v = train.num_classes
    log(
        f"training {cfg.members} x {spec} on {train.spec} ({len(train)} sequences of "
        f"{train.positions} tokens, vocabulary {v}) on {describe_device(device)}"
    )
    t_start = time.perf_counter()
    paths, summaries = [], []
    for i in range(cfg.members):
        seed = cfg.train.seed + i
        torch.manual_seed(seed)
        model = _build(spec, train, trust_code=cfg.trust_code, against=train.spec).to(device)
        member_cfg = type(cfg.train)(**{**cfg.train.to_dict(), "seed": seed})
        source = InMemorySource(train.x, train.y, batch_size=member_cfg.batch_size, seed=seed)

        def evaluate(m: nn.Module) -> dict:
            if test is None:
                return {}
            met = sequence_metrics(m.model, test, device)  # m: the TokenRowModel fit trains
            return {
                "test_perplexity": met["perplexity"],
                "test_bits_per_byte": met["bits_per_byte"],
            }

        t0 = time.perf_counter()
        history = fit(
            TokenRowModel(model, v),
            source,
            loss,  # type: ignore[arg-type]
            member_cfg,
            device,
            evaluate=evaluate,
            history_csv=out / f"member-{i}.history.csv",
            log=log,
            desc=f"member {i}",
            progress=progress,
            config={**cfg.to_dict(), "member": i, "seed": seed},
        )
        metrics = None
        if test is not None:
            metrics = {"dataset": test.spec, **sequence_metrics(model, test, device)}
            log(
                f"member {i}: test perplexity {metrics['perplexity']:.3f}, "
                f"{metrics['bits_per_byte']:.4f} bits per byte"
            )
        meta = {
            "model_spec": spec,
            "in_shape": list(train.sample_shape),
            "num_classes": v,
            "class_names": [],
            "dataset": {
                "spec": train.spec,
                "fingerprint": train.fingerprint,
                **tokenizer_record(train),
            },
            **tokenizer_record(train),
            "sequence": True,
            "config": {**cfg.to_dict(), "member": i, "seed": seed},
            "metrics": metrics,
            "train_seconds": time.perf_counter() - t0,
            "device": describe_device(device),
            "final_epoch": history[-1] if history else None,
        }
        paths.append(save_checkpoint(out / f"member-{i}.pt", model, meta))  # type: ignore[arg-type]
        # A transformers model is also written for transformers alone (hf/, or hf/member-<i>).
        export_hf(model, hf_export_dirs(out, cfg.members)[i], train.tokenizer)
        summaries.append(metrics)
    summary = {
        "members": [p.name for p in paths],
        "model_spec": spec,
        "dataset": train.spec,
        **tokenizer_record(train),
        "train_seconds": time.perf_counter() - t_start,
        "config": cfg.to_dict(),
        "test": {"members": summaries} if test is not None else None,
    }
    atomic_write_json(out / "ensemble.json", summary)
    return summary


def _build(
    spec: str,
    data: SequenceDataset,
    input_stats: tuple[float, float] = (0.0, 1.0),
    trust_code: Sequence[str] = (),
    against: str = "the cache's",
) -> KDModel:
    """A sequence model for ``data`` (P positions, V tokens), checked to read token ids, and an
    ``hf:DIR`` model checked to fit the vocabulary and the sequences (before any forward pass:
    an id beyond its embedding would fail inside transformers)."""
    with trusted_code(trust_code):
        model = build_model(spec, data.sample_shape, data.num_classes, input_stats)
    if not getattr(model.body, "token_inputs", False):
        raise ModelSpecError(
            f"model {spec} does not read token sequences; {data.spec} holds tokens: use a "
            "sequence model (gpt:layers=2,dim=64,heads=4,ctx=128 or hf:DIR)"
        )
    if isinstance(model.body, HFCausalLM):
        problems = student_problems(
            model.body, data.num_classes, data.tokenizer, data.positions, against
        )
        if problems:
            raise ConfigError(problems)
    return model


# -------------------------------------------------------------------------------------- students
def is_token_cache(cache: LogitCache) -> bool:
    """Whether a cache holds rows per token position (its transfer set has a tokenizer)."""
    return "tokenizer" in cache.dataset.extra


class TokenStreamingSource(StreamingCacheSource):
    """:class:`StreamingCacheSource` for a token cache: the unit shuffled and served is a sequence,
    ``(x (B, P) ids, targets grouped (B, P, ...), labels (B, P))`` (``fit`` flattens the
    grouped targets and labels to rows).

    Shards are read and shuffled as for images (whole shards in a buffer, every sequence once per
    epoch, a rank's share under torchrun); a shard's rows are its sequences' positions in order,
    so grouping them P at a time pairs each sequence with its own rows.

    Args:
        y: (N, P) next-token labels of the transfer set (negative: no target / padding).
        positions: P.
        (the rest as :class:`StreamingCacheSource`)
    """

    def __init__(self, *args: object, y: np.ndarray, positions: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.y, self.positions = y, positions

    def _read(self, shard: int) -> tuple:
        start, stop = self.cache.shard_bounds(shard)
        teacher = shard_targets(self.cache, shard, self.members, self.method, self.temperature)
        return (
            self.x[start:stop],
            group_rows(teacher, self.positions),
            self.y[start:stop],
            np.arange(start, stop),
        )


def token_source(
    cache: LogitCache,
    data: SequenceDataset,
    members: list[int],
    method: str,
    temperature: float,
    batch_size: int,
    budget: int,
    seed: int,
    shards: np.ndarray,
    rank: tuple[int, int] = (0, 1),
) -> tuple[InMemorySource | TokenStreamingSource, LoaderPlan]:
    """A token cache's batches: in memory when its rows fit ``budget`` bytes, streamed by shards
    otherwise; both shuffle by sequence, serve every position once per epoch and serve rank k's
    share under torchrun (as :func:`pipeline.training.loader.cache_source` does for images).

    Raises:
        CacheError: the cache's positions per sample are not the sequences'.
    """
    p = data.positions
    if cache.header.positions != p:
        raise CacheError(
            f"{cache.location}: the cache holds {cache.header.positions} rows per sample, the "
            f"sequences of {data.spec} have {p} positions; the cache is not for this data"
        )
    cache.read_row_index()  # refuses a row index other than the layout (sample i: rows i*P..)
    plan = plan_loader(cache, data.x, members, shards, budget, rows_per_sample=p)
    if plan.mode == "stream":
        source = TokenStreamingSource(
            cache,
            data.x,
            members,
            method,
            temperature,
            shards,
            batch_size,
            plan.buffer_shards,
            seed,
            rank=rank,
            y=data.y,
            positions=p,
        )
        return source, plan
    parts = [
        group_rows(shard_targets(cache, int(s), members, method, temperature), p) for s in shards
    ]
    samples = np.concatenate([np.arange(*cache.shard_bounds(int(s))) for s in shards])
    source = InMemorySource(
        data.x[samples],
        data.y[samples],
        cat_targets(parts),
        batch_size=batch_size,
        seed=seed,
        rank=rank,
    )
    return source, plan


def cached_teacher(
    cache: LogitCache, members: list[int], device: torch.device, trust: list[str]
) -> nn.Module | None:
    """The cache's teacher (one member, its checkpoint still where it was and unchanged), for the
    test set's agreement; None when it is not at hand."""
    if len(members) != 1:
        return None
    m = cache.members[members[0]]
    try:
        (lm,) = load_models([m.path], device, trust)  # type: ignore[list-item]
    except (KDError, OSError, ValueError, RuntimeError):  # RuntimeError: out of device memory
        return None
    return lm.model if lm.sha256 == m.checkpoint_sha256 else None


def online_token_teacher(
    models: list[nn.Module], vocab: int, method: str, temperature: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An online teacher ensemble on token batches: (B, P) ids -> combined (B * P, V) logits."""

    def teacher_fn(xb: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([token_rows(m(xb), vocab) for m in models])
        return combine_members(rows, method, temperature)

    return teacher_fn


class SequenceTask:
    """What stage two does differently for token sequences (the recipe in
    :mod:`pipeline.training.distill` is the same): the student reads token ids and is trained as
    a row model (:class:`TokenRowModel`), the loss drops padding (:class:`SequenceLoss`), a model
    is measured by next-token perplexity, bits per byte and token accuracy
    (:func:`sequence_metrics`), and ``--val`` chooses the epoch by validation perplexity.
    """

    name = "sequence"
    # StudentConfig fields this task cannot honour, and why (refused in validation).
    REFUSED = {
        "class_bias": "output-bias offsets per class are for image classifiers",
        "fit_bias_on": "bias fitting is for image transfer sets made with exclude=/keep=",
        "augment": "image augmentations do not apply to token ids",
    }

    def refused(self, cfg: StudentConfig) -> list[str]:
        """Options set away from their defaults that sequences cannot honour."""
        default = StudentConfig()
        out = [
            f"--{name.replace('_', '-')} is not supported for token sequences: {why}"
            for name, why in self.REFUSED.items()
            if getattr(cfg, name) != getattr(default, name)
        ]
        if cfg.views_per_epoch != default.views_per_epoch:
            out.append(
                f"--views-per-epoch {cfg.views_per_epoch} is for view caches of images; token "
                "caches have one row per position"
            )
        return out

    def unit(self, data: Dataset) -> str:
        return f"sequences x {data.positions} tokens"  # type: ignore[attr-defined]

    def build_student(self, cfg: StudentConfig, targets: Any, device: torch.device) -> KDModel:
        """The student (seeded), checked to read token ids and to output the whole vocabulary."""
        data = targets.data
        torch.manual_seed(cfg.train.seed)
        student = _build(cfg.student, data, trust_code=cfg.trust_code).to(device)
        v = data.num_classes
        student.eval()
        with torch.no_grad():
            width = int(student(torch.as_tensor(data.x[:1]).to(device)).shape[-1])
        student.train()
        if width < v:
            raise ConfigError(
                [
                    f"student {cfg.student} outputs {width} logits per position but the "
                    f"teacher's vocabulary has {v} tokens; build the student for the cache's "
                    "vocabulary"
                ]
            )
        return student

    def trainable(self, student: nn.Module, data: SequenceDataset) -> nn.Module:
        return TokenRowModel(student, data.num_classes)

    def loss(self, cfg: StudentConfig) -> SequenceLoss:
        return SequenceLoss(make_loss(cfg.loss, cfg.temperature, cfg.alpha))

    def test_set(
        self, cfg: StudentConfig, targets: Any, log: Callable[[str], None]
    ) -> Dataset | None:
        return _test_set(cfg.eval, targets.data, cfg.data_dir)

    def val_set(self, spec: str, targets: Any, data_dir: str | None) -> Dataset:
        """``--val`` for sequences: a sequence dataset of the same tokenizer."""
        data = targets.data
        val = load_dataset(spec, data_dir)
        if not is_sequence(val):
            raise ConfigError([f"--val {spec} is not a sequence dataset; the models read tokens"])
        check_same_tokenizer(data.tokenizer.describe(), val, "--val")
        return val

    def best_epoch(self) -> BestEpoch:
        return BestEpoch(key="val_nll", tie="val_errors")

    def epoch_metrics(
        self, model: nn.Module, val: Dataset | None, test: Dataset | None, device: torch.device
    ) -> dict:
        """After each epoch: validation NLL and perplexity (what ``--val`` chooses on), and the
        test perplexity and bits per byte (the history only)."""
        student = model.model if isinstance(model, TokenRowModel) else model
        row = {}
        if val is not None:
            met = sequence_metrics(student, val, device)  # type: ignore[arg-type]
            row.update(
                val_nll=met["nll"], val_perplexity=met["perplexity"], val_errors=met["errors"]
            )
        if test is not None:
            met = sequence_metrics(student, test, device)  # type: ignore[arg-type]
            row.update(test_perplexity=met["perplexity"], test_bits_per_byte=met["bits_per_byte"])
        return row

    def final_metrics(
        self,
        student: nn.Module,
        cfg: StudentConfig,
        targets: Any,
        test: Dataset | None,
        held: Dataset | None,
        absent: list[int],
        device: torch.device,
        log: Callable[[str], None],
    ) -> dict:
        """The test set's next-token metrics, with the teacher's agreement when it is at hand."""
        if test is None:
            return {}
        teacher = targets.teacher
        if teacher is None and targets.cache is not None:
            # The cache's teacher, for agreement: loaded only here, on the rank that measures.
            teacher = cached_teacher(targets.cache, targets.members, device, cfg.trust_code)
        met = sequence_metrics(student, test, device, teacher)  # type: ignore[arg-type]
        return {"test": {"dataset": test.spec, **met}}

    def describe_result(self, t: dict, test: Dataset) -> str:
        return (
            f"student: test perplexity {t['perplexity']:.3f}, {t['bits_per_byte']:.4f} bits per "
            f"byte, token accuracy {percent(t['accuracy'])} on {test.spec}"
        )

    def describe_selection(self, best: BestEpoch, epochs: int, val: Dataset) -> str:
        return (
            f"kept epoch {best.epoch} of {epochs}: validation perplexity "
            f"{best.row['val_perplexity']:.3f} on --val {val.spec}"
        )

    def save_outputs(self, student: nn.Module, targets: Any, out: Path) -> None:
        """Beside ``student.pt``: an ``hf:DIR`` student as ``hf/`` (``save_pretrained``, with
        the data's tokenizer), which transformers loads without kd-pipeline."""
        export_hf(student, out / "hf", targets.data.tokenizer)

    def checkpoint_meta(self, targets: Any) -> dict:
        data = targets.data
        return {
            "dataset": {
                "spec": data.spec,
                "fingerprint": data.fingerprint,
                **tokenizer_record(data),
            },
            **tokenizer_record(data),
            "sequence": True,
            "class_names": [],
        }
