"""Sequence distillation: teachers and students over token sequences, one loss term per token.

A sequence dataset (:mod:`pipeline.sequences.data`) holds (N, P) token ids and next-token labels;
a sequence model maps (B, P) ids to (B, P, W) logits. Everything here reuses the one training loop
(:func:`pipeline.training.loop.fit`) and the losses on (rows, C): the model is wrapped to return
its logits as rows (B * P, V) (:class:`TokenRowModel`: sequence by sequence, position by position,
padded heads dropped), the batches carry the matching rows of soft targets and the labels flattened
(B * P,), and :class:`SequenceLoss` drops padding before the paper's loss::

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(next token, q_1)    (per token)

Cached rows are matched to a batch's sequences by (sample id, position) through the cache's ids and
``row_start`` (:class:`SequenceSource`), never by batch order. Metrics: test perplexity, bits per
byte (the test tokens' total NLL in bits over the bytes of text they stand for), token accuracy and
agreement with the teacher's argmax tokens.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.format import LogitCache, cache_fingerprint, read_header
from pipeline.cache.transfer import load_transfer_set
from pipeline.checkpoints import fit_problems, load_models, save_checkpoint
from pipeline.config import StudentConfig, TeacherConfig
from pipeline.datasets import Dataset, default_eval_spec, load_dataset
from pipeline.devices import describe_device, resolve_device
from pipeline.errors import CacheError, ConfigError, KDError, ModelSpecError
from pipeline.files import atomic_write_json
from pipeline.metrics import percent
from pipeline.models import KDModel, build_model
from pipeline.sequences.data import PAD, SequenceDataset, is_sequence, tokenizer_record
from pipeline.sequences.models import token_rows
from pipeline.training.loader import check_member_kinds, shard_targets
from pipeline.training.loop import fit
from pipeline.training.losses import DistillationLoss, combine_members, make_loss
from pipeline.training.targets import SparseTargets, cat_targets

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


class SequenceSource:
    """Shuffled batches of whole sequences: ``(x (B, P), soft-target rows (B*P) | None, labels
    (B*P,))``, every sequence once per epoch.

    Args:
        x: (n, P) token ids. y: (n, P) labels (negative: no target / padding).
        teacher: soft-target rows (dense (R, C) or sparse), or None.
        first_row: (n,) the row in ``teacher`` of each sequence's position 0 (its rows are
            ``first_row[i] .. first_row[i] + P - 1``, position by position).
        seed: epoch e's order is drawn from ``[seed, e]``.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        teacher: Targets | None = None,
        first_row: np.ndarray | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        self.x = torch.as_tensor(x)
        self.y = torch.as_tensor(y).long()
        self.teacher, self.batch_size, self.seed = teacher, batch_size, seed
        self.first_row = None if first_row is None else torch.as_tensor(first_row).long()
        self.positions = torch.arange(self.x.shape[1])

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)

    @property
    def num_rows(self) -> int:
        return int(self.x.shape[0])

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, Targets | None, torch.Tensor]]:
        order = torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(len(self.x)))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            soft = None
            if self.teacher is not None:
                rows = (self.first_row[idx][:, None] + self.positions).reshape(-1)
                soft = self.teacher[rows]
            yield self.x[idx], soft, self.y[idx].reshape(-1)


class SequenceLoss:
    """The paper's loss per token on rows, with padding dropped (see the module docstring).

    Args:
        inner: the row loss whose soft term is used (``kd`` or ``logit-mse``), with T and alpha.
    """

    def __init__(self, inner: DistillationLoss) -> None:
        self.inner = inner

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
    """Whether a dataset spec names a sequence source (``text:``, ``tokens:``)."""
    return bool(spec) and spec.partition(":")[0] in SEQUENCE_SOURCES  # type: ignore[union-attr]


def is_sequence_run(cfg: StudentConfig) -> bool:
    """Whether ``train-student`` with ``cfg`` distils a sequence model (a token cache, or an
    online teacher on a sequence dataset)."""
    if cfg.cache:
        h = read_header(cfg.cache_location)
        return h is not None and "tokenizer" in h.dataset.extra
    return is_sequence_spec(cfg.dataset)


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
        model = _build(spec, train).to(device)
        member_cfg = type(cfg.train)(**{**cfg.train.to_dict(), "seed": seed})
        source = SequenceSource(train.x, train.y, batch_size=member_cfg.batch_size, seed=seed)

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
    spec: str, data: SequenceDataset, input_stats: tuple[float, float] = (0.0, 1.0)
) -> KDModel:
    """A sequence model for ``data`` (P positions, V tokens), checked to read token ids."""
    model = build_model(spec, data.sample_shape, data.num_classes, input_stats)
    if not getattr(model.body, "token_inputs", False):
        raise ModelSpecError(
            f"model {spec} does not read token sequences; {data.spec} holds tokens: use a "
            "sequence model (gpt:layers=2,dim=64,heads=4,ctx=128 or hf:DIR)"
        )
    return model


# -------------------------------------------------------------------------------------- students
def train_sequence_student(
    cfg: StudentConfig, log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """``train-student`` / ``sweep`` for sequence models: soft targets per token from a cache
    (dense, topk or sampled rows) or a live teacher, the paper's loss per token, test perplexity.

    Writes the run directory as image students do: ``config.json``, ``history.csv``,
    ``student.pt``, then ``metrics.json`` (last: a run with one is finished).
    """
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    _check_run_dir(cfg, out, log)
    if cfg.cache:
        data, source, teacher_fn, record, teacher = _cache_source(cfg, device)
    else:
        data, source, teacher_fn, record, teacher = _online_source(cfg, device)
    test = _test_set(cfg.eval, data, cfg.data_dir)
    torch.manual_seed(cfg.train.seed)
    student = _build(cfg.student, data).to(device)
    v = data.num_classes
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "student.pt"):
        (out / name).unlink(missing_ok=True)
    atomic_write_json(out / "config.json", cfg.to_dict())

    def evaluate(m: nn.Module) -> dict:
        if test is None:
            return {}
        met = sequence_metrics(student, test, device)
        return {"test_perplexity": met["perplexity"], "test_bits_per_byte": met["bits_per_byte"]}

    log(
        f"training {cfg.student} on {source.num_rows} sequences x {data.positions} tokens: "
        f"loss={cfg.loss} T={cfg.temperature} alpha={cfg.alpha} on {describe_device(device)}, "
        f"{record['describe']}"
    )
    history = fit(
        TokenRowModel(student, v),
        source,  # type: ignore[arg-type]
        SequenceLoss(make_loss(cfg.loss, cfg.temperature, cfg.alpha)),  # type: ignore[arg-type]
        cfg.train,
        device,
        teacher_fn=teacher_fn,
        evaluate=evaluate,
        history_csv=out / "history.csv",
        log=log,
        desc="student",
        progress=progress,
    )
    metrics: dict = {"dataset": data.spec}
    if test is not None:
        metrics["test"] = {"dataset": test.spec, **sequence_metrics(student, test, device, teacher)}
    metrics["train_seconds"] = sum(r["seconds"] for r in history)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    metrics["epochs"] = len(history)
    metrics["final_epoch"] = history[-1]
    provenance = {k: val for k, val in record.items() if k != "describe"}
    meta = {
        "model_spec": cfg.student,
        "in_shape": list(data.sample_shape),
        "num_classes": v,
        "class_names": [],
        "dataset": {"spec": data.spec, "fingerprint": data.fingerprint, **tokenizer_record(data)},
        **tokenizer_record(data),
        "sequence": True,
        "config": cfg.to_dict(),
        **provenance,
        "metrics": metrics.get("test"),
        "device": describe_device(device),
    }
    save_checkpoint(out / "student.pt", student, meta)
    result = {**provenance, "metrics": metrics, "config": cfg.to_dict()}
    atomic_write_json(out / "metrics.json", result)
    if test is not None:
        t = metrics["test"]
        log(
            f"student: test perplexity {t['perplexity']:.3f}, {t['bits_per_byte']:.4f} bits per "
            f"byte, token accuracy {percent(t['accuracy'])} on {test.spec}"
        )
    return result


def _check_run_dir(cfg: StudentConfig, out: Path, log: Callable[[str], None]) -> None:
    try:
        recorded = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return
    now = json.loads(json.dumps(cfg.to_dict()))
    if recorded != now and not cfg.overwrite:
        diffs = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        raise ConfigError(
            [
                f"--out {out} already holds a run of another config (differs in "
                f"{', '.join(diffs[:4])}); choose another --out, or pass --overwrite to replace it"
            ]
        )
    log(f"replacing the run in {out}")


def _cache_source(cfg: StudentConfig, device: torch.device) -> tuple:
    """The cache's rows for the transfer set's sequences, matched by (sample id, position)."""
    cache = LogitCache(cfg.cache_location, allow_partial=cfg.allow_partial)
    members = cfg.members if cfg.members is not None else list(range(len(cache.members)))
    bad = [m for m in members if m >= len(cache.members)]
    if bad:
        raise ConfigError(
            [f"--members {bad} out of range: the cache has members 0..{len(cache.members) - 1}"]
        )
    check_member_kinds(cache, members, cfg.ensemble, cfg.loss)
    want = dict(cache.dataset.extra.get("tokenizer") or {})
    if cfg.dataset:  # say that the tokenizer differs, not only that the fingerprint does
        check_same_tokenizer(
            want, load_dataset(cfg.dataset, cfg.data_dir), "--dataset", f"the cache {cfg.cache} was"
        )
    data = load_transfer_set(cache, cfg.dataset, cfg.data_dir)
    if not is_sequence(data):
        raise CacheError(f"{cfg.cache}: its transfer set {data.spec} is not a sequence dataset")
    shards = cache.done_shards(members)
    if not len(shards):
        raise CacheError(
            f"{cache.location}: no finished shards yet (0/{cache.n_shards}); run cache-logits"
        )
    parts, local_first = [], np.full(cache.n, -1, dtype=np.int64)
    row_start, row_count = cache.read_row_index()
    bad_rows = np.flatnonzero(row_count != data.positions)
    if bad_rows.size:
        raise CacheError(
            f"{cache.location}: samples {bad_rows[:5].tolist()} have {row_count[bad_rows[:5]]} "
            f"rows, the sequences {data.positions} positions; the cache is not for this data"
        )
    local = 0
    for s in shards:
        lo, hi = cache.shard_bounds(int(s))
        row_lo, row_hi = cache.row_bounds(int(s))
        parts.append(shard_targets(cache, int(s), members, cfg.ensemble, cfg.temperature))
        local_first[lo:hi] = local + row_start[lo:hi] - row_lo
        local += row_hi - row_lo
    teacher = cat_targets(parts)
    # Sample id -> the cache's sample index -> its rows (ids equal the dataset's: checked above).
    ids = cache.read_ids()
    order = np.argsort(ids)
    at = order[np.searchsorted(ids, data.ids, sorter=order)]
    first = local_first[at]
    use = first >= 0  # samples of finished shards
    source = SequenceSource(
        data.x[use], data.y[use], teacher, first[use], cfg.train.batch_size, cfg.train.seed
    )
    specs = [cache.storage(m) for m in members]
    record = {
        "cache": {
            "location": cfg.cache,
            "fingerprint": cache_fingerprint(cache.header, members),
            "dataset": data.spec,
            "dataset_fingerprint": data.fingerprint,
            "tokenizer": want,
            "members": members,
            "member_checkpoints": [cache.members[m].checkpoint_sha256 for m in members],
            "storage": [s.text for s in specs],
            "complete": cache.complete,
            "shards_used": len(shards),
            "n_shards": cache.n_shards,
            "rows_used": int(use.sum()) * data.positions,
        },
        "describe": f"{cache.storage(members[0]).text} cache rows in memory",
    }
    teacher_model = _cached_teacher(cache, members, device, cfg.trust_code)
    return data, source, None, record, teacher_model


def _cached_teacher(
    cache: LogitCache, members: list[int], device: torch.device, trust: list[str]
) -> nn.Module | None:
    """The cache's teacher (one member, its checkpoint still where it was and unchanged), for the
    test set's agreement; None when it is not at hand."""
    if len(members) != 1:
        return None
    m = cache.members[members[0]]
    try:
        (lm,) = load_models([m.path], device, trust)  # type: ignore[list-item]
    except (KDError, OSError, ValueError):
        return None
    return lm.model if lm.sha256 == m.checkpoint_sha256 else None


def _online_source(cfg: StudentConfig, device: torch.device) -> tuple:
    teachers = load_models(cfg.online_teacher or [], device, cfg.trust_code)
    data = load_dataset(cfg.dataset or "", cfg.data_dir)
    problems = fit_problems(teachers, data)
    if problems:
        raise ConfigError(problems)
    assert isinstance(data, SequenceDataset)
    models = [t.model for t in teachers]
    v = data.num_classes

    def teacher_fn(xb: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([token_rows(m(xb), v) for m in models])
        return combine_members(rows, cfg.ensemble, cfg.temperature)

    source = SequenceSource(data.x, data.y, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    record = {
        "online_teacher": {
            "paths": [str(t.path) for t in teachers],
            "checkpoints": [t.sha256 for t in teachers],
            "dataset": data.spec,
            "dataset_fingerprint": data.fingerprint,
        },
        "describe": "online teacher",
    }
    return data, source, teacher_fn, record, models[0] if len(models) == 1 else None
