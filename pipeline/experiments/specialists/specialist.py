"""One specialist (paper section 5, step 2): its class map, rows, initial weights and training.

Specialist m predicts its classes S_m plus one *dustbin* class (every other class). Its training
rows are every transfer-set row of S_m plus as many rows drawn (seeded) from the rest
(:func:`sampling_plan`), its soft targets the generalist's distribution collapsed onto S_m +
dustbin (:func:`collapse_logits`), its hard labels mapped the same way (:func:`specialist_labels`);
it trains through :func:`pipeline.training.fit` with the ``kd`` loss. It starts from a generalist
member's weights when the architecture is the same (:func:`specialist_from_generalist`).
Afterwards its dustbin logit is raised by the log of the factor by which the sampling
over-represented S_m. Specialists are independent dask tasks (:func:`run_tasks`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.cache.location import CacheLocation
from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.cache.transfer import load_transfer_set
from pipeline.checkpoints import LoadedModel, load_checkpoint, member_paths, save_checkpoint
from pipeline.datasets import Dataset
from pipeline.errors import CacheError, CheckpointError, ConfigError
from pipeline.files import atomic_write_json
from pipeline.models import KDModel, build_model, check_trusted
from pipeline.training.loader import combined_shard
from pipeline.training.loop import fit
from pipeline.training.losses import make_loss
from pipeline.training.sources import InMemorySource
from pipeline.training.train_config import TrainConfig

DUSTBIN = "dustbin"


# ------------------------------------------------------------------------------------ class maps
def collapse_logits(
    logits: torch.Tensor, classes: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """Logits whose softmax at T is ``softmax(logits / T)`` collapsed onto ``classes`` + a dustbin.

    ``w = [v_S, T · logsumexp(v_rest / T)]``: the kept classes keep their logits and the dustbin
    gets the log-sum-exp of the rest, so ``softmax(w / T)`` gives the kept classes their probability
    and the dustbin the sum of the others'. The existing ``kd`` loss then trains on the collapsed
    distribution at any T unchanged.

    Args:
        logits: (B, C) generalist logits. classes: the m kept classes. temperature: T.

    Returns:
        (B, m + 1) float32; the last column is the dustbin.
    """
    v = logits.float()
    keep = torch.as_tensor(classes, dtype=torch.long, device=v.device)
    rest = torch.ones(v.shape[-1], dtype=torch.bool, device=v.device)
    rest[keep] = False
    dust = temperature * torch.logsumexp(v[..., rest] / temperature, dim=-1, keepdim=True)
    return torch.cat([v[..., keep], dust], dim=-1)


def collapse_log_probs(log_q: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Log-probabilities (B, C) collapsed onto ``classes`` + dustbin: (B, m + 1), still
    normalised."""
    return collapse_logits(log_q, classes, 1.0)


def specialist_labels(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Labels (N,) mapped to a specialist's outputs: position in ``classes``, or m (the dustbin)."""
    lut = np.full(int(max(labels.max(initial=0), max(classes))) + 1, len(classes), dtype=np.int64)
    lut[classes] = np.arange(len(classes))
    return lut[labels]


@dataclass
class SamplingPlan:
    """A specialist's training rows: half from its classes, half from the rest (seeded).

    Attributes:
        rows: (n,) indices into the transfer set, sorted.
        natural_fraction: share of the transfer set in the specialist's classes (f).
        train_fraction: share of ``rows`` in them (about 0.5).
        dustbin_correction: ``log(oversampling)`` added to the dustbin logit after training,
            where oversampling = (train odds of the specialist's classes) / (natural odds) =
            ``(train_fraction / (1 − train_fraction)) / (f / (1 − f))``.
    """

    rows: np.ndarray
    natural_fraction: float
    train_fraction: float
    dustbin_correction: float

    def summary(self) -> dict:
        return {
            "rows": int(self.rows.size),
            "natural_fraction": self.natural_fraction,
            "train_fraction": self.train_fraction,
            "dustbin_correction": self.dustbin_correction,
        }


def sampling_plan(in_group: np.ndarray, seed: int, max_rows: int | None = None) -> SamplingPlan:
    """Choose a specialist's rows: every in-group row (at most ``max_rows // 2``) and as many from
    the rest.

    Args:
        in_group: (N,) bool, which transfer-set rows belong to the specialist's classes.
        seed: sampling seed.
        max_rows: optional cap on the rows (half in-group, half rest).

    Raises:
        ConfigError: no rows in the group or none outside it.
    """
    rng = np.random.default_rng(seed)
    inside, outside = np.flatnonzero(in_group), np.flatnonzero(~in_group)
    if inside.size == 0 or outside.size == 0:
        raise ConfigError(
            [
                f"a specialist needs transfer rows both in its classes and outside them; found "
                f"{inside.size} in and {outside.size} out"
            ]
        )
    half = inside.size if max_rows is None else min(inside.size, max(1, max_rows // 2))
    if half < inside.size:
        inside = rng.choice(inside, size=half, replace=False)
    # Without replacement while the rest is large enough (the paper's case: a specialist's classes
    # are a small part of the data); with replacement otherwise, so the split stays half and half.
    rest = rng.choice(outside, size=half, replace=outside.size < half)
    rows = np.sort(np.concatenate([inside, rest]))
    f = float(in_group.mean())
    t = 0.5  # by construction: as many rows from the rest as from the classes
    return SamplingPlan(rows, f, t, float(math.log((t / (1 - t)) / (f / (1 - f)))))


# ----------------------------------------------------------------------------------- initialisation
def _last_linear(model: nn.Module, width: int) -> tuple[str, nn.Linear]:
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == width
    ]
    if not found:
        raise CheckpointError(
            f"no final nn.Linear with {width} outputs in {type(model).__name__}; cannot resize "
            "it for a specialist: use --init scratch"
        )
    return found[-1]


@torch.no_grad()
def specialist_from_generalist(
    member: KDModel, classes: list[int], in_shape: tuple[int, ...]
) -> KDModel:
    """A specialist with the generalist member's weights and a resized last layer.

    The last layer keeps the rows (weights and bias) of ``classes``; the dustbin row is the mean of
    the other classes' rows with ``log(C − m)`` added to its bias. Logits are linear in the features
    while the dustbin's ideal logit is ``logsumexp`` of the others'; ``mean + log(count)`` is the
    linear function closest to it (exact when the others are equal, a lower bound otherwise), so the
    specialist starts out predicting about what the generalist collapsed onto its classes predicts.

    Args:
        member: a generalist (member) model with C outputs.
        classes: the m specialist classes.
        in_shape: one sample's shape.

    Returns:
        A ``KDModel`` with m + 1 outputs, in train mode, on the CPU.
    """
    c = int(member.output_bias.numel())
    spec = member.spec
    stats = (float(member.input_mean), float(member.input_std))
    new = build_model(spec, in_shape, len(classes) + 1, stats)
    name, old_last = _last_linear(member.body, c)
    _, new_last = _last_linear(new.body, len(classes) + 1)
    state = {
        k: v
        for k, v in member.state_dict().items()
        if not k.startswith(f"body.{name}.") and k != "output_bias"
    }
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {f"body.{name}.weight", f"body.{name}.bias", "output_bias"}:
        raise CheckpointError(
            f"the generalist's weights do not fit {spec!r} for a specialist "
            f"(missing {missing}, unexpected {unexpected}); use --init scratch"
        )
    keep = torch.as_tensor(classes)
    rest = torch.ones(c, dtype=torch.bool)
    rest[keep] = False
    w, b = old_last.weight.cpu(), old_last.bias.cpu()
    new_last.weight.copy_(torch.cat([w[keep], w[rest].mean(0, keepdim=True)]))
    new_last.bias.copy_(
        torch.cat([b[keep], b[rest].mean(0, keepdim=True) + math.log(int(rest.sum()))])
    )
    new.train()
    return new


# ---------------------------------------------------------------------------------- generalist data
def cached_generalist(cache: LogitCache, temperature: float = 1.0) -> torch.Tensor:
    """The cache's combined generalist logits (all members, mean-probs at T), (N, C) float32; needs
    a complete cache."""
    if not cache.complete:
        raise CacheError(
            f"{cache.location}: specialists need a complete cache; finish it with cache-logits"
        )
    members = list(range(len(cache.members)))
    return torch.cat(
        [
            combined_shard(cache, s, members, "mean-probs", temperature)
            for s in range(cache.n_shards)
        ]
    )


def transfer_set(cache: LogitCache, data_dir: str | None, dataset: str | None = None) -> Dataset:
    """The dataset behind a cache (``dataset``: this machine's copy of it), checked to be the one
    the cache was made on (:func:`~pipeline.cache.transfer.load_transfer_set`)."""
    return load_transfer_set(cache, dataset, data_dir)


def generalist_members(
    cache: LogitCache,
    given: list[str] | None,
    device: torch.device | str = "cpu",
    trust_code: Sequence[str] = (),
) -> list[LoadedModel]:
    """Load the checkpoints of the cache's members (the generalist), checked by sha256.

    Args:
        cache: the generalist's cache.
        given: checkpoints / ensemble directories (``--generalist``); None: the paths the cache
            header records (as given, then relative to the directory above the cache's ``data/``).
        trust_code: what the members' recorded ``py:`` / ``torchscript:`` specs may use.

    Raises:
        CheckpointError: a checkpoint is missing or is not the one the cache was made with.
    """
    want = [m.checkpoint_sha256 for m in cache.members]
    if given:
        paths = [p for g in given for p in member_paths(g)]
    else:
        paths = []
        here = cache.location.local_path
        base = here.resolve().parents if here is not None else []
        for m in cache.members:
            cands = [Path(m.path)] + [b / m.path for b in base[:3]]
            hit = next((p for p in cands if p.is_file()), None)
            if hit is None:
                raise CheckpointError(
                    f"the generalist's member {m.index} ({m.path}, recorded in the cache) was "
                    "not found from here; pass --generalist PATH (its checkpoint or ensemble "
                    "directory)"
                )
            paths.append(hit)
    loaded = [load_checkpoint(p, device, trust_code) for p in paths]
    have = [lm.sha256 for lm in loaded]
    if sorted(have) != sorted(want):
        raise CheckpointError(
            "--generalist must be the checkpoints the cache was made with; the cache's members are "
            + ", ".join(f"{m.path} ({m.checkpoint_sha256[:19]})" for m in cache.members)
            + "; found "
            + ", ".join(f"{lm.path} ({lm.sha256[:19]})" for lm in loaded)
        )
    by_sha = {lm.sha256: lm for lm in loaded}
    return [by_sha[s] for s in want]


# ----------------------------------------------------------------------------------------- training
@dataclass
class SpecialistTask:
    """Everything one specialist's training needs. Plain data: it is pickled to dask workers."""

    index: int
    classes: list[int]
    cache: CacheLocation  # with its storage options: a dask worker opens it too
    out: str
    model_spec: str
    init_checkpoint: str | None  # a generalist member to start from, or None (from scratch)
    init_sha256: str | None
    temperature: float
    alpha: float
    train: dict
    max_rows: int | None
    data_dir: str | None
    device: str
    dustbin_correction: bool = True
    torch_threads: int = 0
    trust_code: tuple[str, ...] = ()  # what model_spec and the init checkpoint may import
    dataset: str | None = None  # this machine's copy of the cache's transfer set (--dataset)


def train_specialist(task: SpecialistTask, log: Callable[[str], None] | None = None) -> dict:
    """Train one specialist through :func:`pipeline.training.fit` and save ``specialist.pt`` (a dask
    task).

    Returns:
        The specialist's record (classes, sampling plan, dustbin correction, history summary,
        seconds).
    """
    from pipeline.devices import resolve_device

    t0 = time.perf_counter()
    if task.torch_threads:
        torch.set_num_threads(task.torch_threads)
    device = resolve_device(task.device)
    cache = LogitCache(task.cache)
    data = transfer_set(cache, task.data_dir, task.dataset)
    cfg = TrainConfig(**task.train)
    labels = data.y if data.y is not None else None
    teacher = cached_generalist(cache, task.temperature)  # (N, C) at T
    by_class = labels if labels is not None else teacher.argmax(1).numpy()
    plan = sampling_plan(np.isin(by_class, task.classes), seed=cfg.seed, max_rows=task.max_rows)
    rows = torch.from_numpy(plan.rows)
    soft = collapse_logits(teacher[rows], task.classes, task.temperature)
    hard = None if labels is None else specialist_labels(labels[plan.rows], task.classes)
    alpha = task.alpha if hard is not None else 1.0
    torch.manual_seed(cfg.seed)
    if task.init_checkpoint:
        member = load_checkpoint(task.init_checkpoint, "cpu", task.trust_code)
        if task.init_sha256 and member.sha256 != task.init_sha256:
            raise CheckpointError(
                f"{task.init_checkpoint} has sha256 {member.sha256}, expected {task.init_sha256}"
            )
        model = specialist_from_generalist(member.model, task.classes, data.sample_shape)
    else:
        # model_spec may come from the cache's header: checked again on the worker building it.
        check_trusted(task.model_spec, task.trust_code, f"{task.cache} (the specialists' model)")
        model = build_model(
            task.model_spec, data.sample_shape, len(task.classes) + 1, data.input_stats
        )
    model = model.to(device)
    source = InMemorySource(data.x[plan.rows], hard, soft, batch_size=cfg.batch_size, seed=cfg.seed)
    out = Path(task.out)
    out.mkdir(parents=True, exist_ok=True)
    history = fit(
        model,
        source,
        make_loss("kd", task.temperature, alpha),
        cfg,
        device,
        history_csv=out / "history.csv",
        log=log,
        desc=f"specialist {task.index}",
        progress=False,
    )
    correction = plan.dustbin_correction if task.dustbin_correction else 0.0
    with torch.no_grad():
        model.output_bias.zero_()
        model.output_bias[-1] = correction
    names = cache.header.class_names
    record = {
        "index": task.index,
        "classes": task.classes,
        "class_names": [names[c] for c in task.classes],
        "model_spec": task.model_spec,
        "init": task.init_checkpoint or "scratch",
        "sampling": plan.summary(),
        "dustbin_correction_applied": correction,
        "temperature": task.temperature,
        "alpha": alpha,
        "train": cfg.to_dict(),
        "final_epoch": history[-1],
        "train_seconds": sum(r["seconds"] for r in history),
        "seconds": time.perf_counter() - t0,
    }
    meta = {
        "model_spec": task.model_spec,
        "in_shape": list(data.sample_shape),
        "num_classes": len(task.classes) + 1,
        "class_names": [*record["class_names"], DUSTBIN],
        "dataset": {"spec": data.spec, "fingerprint": data.fingerprint},
        "cache": {"location": task.cache.display, "fingerprint": cache_fingerprint(cache.header)},
        "specialist": {k: v for k, v in record.items() if k != "final_epoch"},
    }
    save_checkpoint(out / "specialist.pt", model, meta)
    atomic_write_json(out / "specialist.json", record)
    return record


def run_tasks(tasks: list[SpecialistTask], workers: int, log: Callable[[str], None]) -> list[dict]:
    """Train specialists in this process (``workers`` <= 1) or as tasks on a dask ``LocalCluster``
    of processes."""
    if workers <= 1:
        return [train_specialist(t, log=log) for t in tasks]
    from dask.distributed import as_completed

    from pipeline.cluster import dask_cluster

    with dask_cluster(min(workers, len(tasks))) as cluster:
        tasks = [replace(t, torch_threads=cluster.torch_threads) for t in tasks]
        futures = cluster.client.map(train_specialist, tasks, pure=False)
        records = {}
        for fut in as_completed(futures):
            r = fut.result()
            records[r["index"]] = r
            log(
                f"specialist {r['index']} ({', '.join(r['class_names'])}) "
                f"done in {r['seconds']:.1f}s"
            )
        return [records[t.index] for t in tasks]
