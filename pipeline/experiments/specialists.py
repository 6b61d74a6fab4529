"""Specialist ensembles (Hinton et al. 2015, section 5): one generalist plus specialists on confusable classes.

Everything is built on a logit cache of the generalist (one model, or the ensemble whose members the cache holds)
and on the one training loop, :func:`pipeline.training.fit`:

1. **Clusters** (:func:`cluster_classes`). The generalist's predicted class probabilities ``p`` over the
   transfer set give the class-by-class covariance; k-means (scikit-learn) clusters its columns. The raw covariance
   is ``E[p pᵀ] − π πᵀ``: its off-diagonal is dominated by ``−π_i π_j`` (probabilities sum to one, so every pair of
   classes covaries negatively) and each column by its diagonal, so k-means on it does not find confusable groups
   (it did not on Fashion-MNIST). The default ``log-moment`` similarity clusters the columns of
   ``log E[p pᵀ]`` instead — the covariance plus ``π πᵀ`` (how much probability two classes get *together*), on a
   log scale so that 1e-5 and 1e-2 co-predictions are told apart. ``covariance`` keeps the raw one. Automatic K:
   the largest K in 2..C-1 whose k-means partition comes within 0.5 % of the best modularity of the
   co-prediction graph (weights ``E[p_i p_j]``, i ≠ j). Clusters of one class get no specialist.
2. **Specialists** (:func:`train_specialist`). Specialist m predicts its classes S_m plus one *dustbin* class
   (every other class). Its training rows are every transfer-set row of S_m plus as many rows drawn (seeded) from
   the rest, its soft targets the generalist's distribution collapsed onto S_m + dustbin
   (:func:`collapse_logits`), its hard labels mapped the same way; it trains through ``fit`` with the ``kd`` loss.
   It starts from a generalist member's weights when the architecture is the same
   (:func:`specialist_from_generalist`). Afterwards its dustbin logit is raised by the log of the factor by which
   the sampling over-represented S_m (:func:`sampling_plan`). Specialists are independent dask tasks.
3. **Inference** (:func:`combine_distributions`). For each test case, specialists whose classes meet the
   generalist's top-n classes are active; the full distribution q minimises
   ``KL(p_g ‖ q) + Σ_active KL(p_m ‖ q_m)`` (q_m = q collapsed onto S_m + dustbin), found by batched gradient
   descent (Adam) on q's logits starting from log p_g.
4. **Report** (:func:`evaluation_report`): test accuracy of the generalist and of the combination, per class, and
   the paper's Table 4 view (gain by the number of active specialists covering the correct class).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.cache.format import LogitCache, cache_fingerprint
from pipeline.cache.location import CacheLocation
from pipeline.checkpoints import LoadedModel, load_checkpoint, member_paths, save_checkpoint
from pipeline.config import SpecialistsConfig
from pipeline.datasets import Dataset, load_dataset
from pipeline.errors import CacheError, CheckpointError, ConfigError, KDError
from pipeline.metrics import classification_metrics, predict_logits
from pipeline.models import KDModel, build_model
from pipeline.training.loader import combined_shard
from pipeline.training.loop import InMemorySource, TrainConfig, fit
from pipeline.training.losses import combine_members, make_loss

SIMILARITIES = ("log-moment", "covariance")
MODULARITY_TOLERANCE = 0.005  # automatic K: the largest K whose modularity is within 0.5 % of the best
DUSTBIN = "dustbin"


# --------------------------------------------------------------------------------------------------- clusters
def coprediction(probs: np.ndarray) -> np.ndarray:
    """``E[p pᵀ]``: how much probability two classes get together. (N, C) -> (C, C), float64."""
    p = np.asarray(probs, dtype=np.float64)
    return p.T @ p / max(1, p.shape[0])


def similarity_matrix(probs: np.ndarray, kind: str = "log-moment") -> np.ndarray:
    """The (C, C) matrix whose columns k-means clusters (see the module docstring for why ``log-moment``)."""
    p = np.asarray(probs, dtype=np.float64)
    if kind == "covariance":
        return np.cov(p, rowvar=False)
    if kind == "log-moment":
        # The floor keeps never-co-predicted pairs finite (float16 caches give exact zeros).
        return np.log(np.maximum(coprediction(p), 1e-12))
    raise ConfigError([f"similarity must be one of {', '.join(SIMILARITIES)}, got {kind!r}"])


def modularity(weights: np.ndarray, labels: np.ndarray) -> float:
    """Newman modularity of a partition of a weighted graph ((C, C) symmetric weights, zero diagonal)."""
    total = float(weights.sum())
    if total <= 0:
        return 0.0
    degree = weights.sum(axis=0)
    q = 0.0
    for g in np.unique(labels):
        inside = labels == g
        q += float(weights[np.ix_(inside, inside)].sum()) / total - (float(degree[inside].sum()) / total) ** 2
    return q


@dataclass
class Clustering:
    """Classes grouped by confusability.

    Attributes:
        groups: every cluster (sorted class lists), largest confusion first.
        specialists: the clusters with two or more classes: one specialist each.
        k: number of clusters; auto: whether k was chosen by modularity.
        scores: modularity of the k-means partition for each K tried (``{K: modularity}``).
        similarity: which matrix was clustered.
        confusion: per group: ``within`` = mean probability the generalist gives to the group's *other*
            classes on rows labeled in the group, ``errors_within`` = share of its errors on those rows that stay
            in the group, ``rows``.
    """

    groups: list[list[int]]
    specialists: list[list[int]]
    k: int
    auto: bool
    scores: dict[int, float]
    similarity: str
    confusion: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = {str(k): v for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Clustering:
        return cls(groups=d["groups"], specialists=d["specialists"], k=d["k"], auto=d["auto"],
                   scores={int(k): v for k, v in d["scores"].items()}, similarity=d["similarity"],
                   confusion=d.get("confusion", []))


def cluster_classes(probs: np.ndarray, labels: np.ndarray | None = None, k: int | None = None,
                    classes_per_specialist: int | None = None, similarity: str = "log-moment",
                    seed: int = 0) -> Clustering:
    """Cluster classes by the generalist's confusions.

    Args:
        probs: (N, C) the generalist's predicted probabilities on the transfer set.
        labels: (N,) labels (for the confusion report), or None: the generalist's argmax stands in.
        k: number of clusters; None: ``ceil(C / classes_per_specialist)`` if that is given, else automatic.
        classes_per_specialist: the typical specialist size N (sets K = ceil(C / N)).
        similarity: ``log-moment`` (default) or ``covariance`` (the paper's raw matrix).
        seed: k-means seed.

    Returns:
        The clustering (see :class:`Clustering`).
    """
    from sklearn.cluster import KMeans  # local: the rest of the library does not need scikit-learn

    p = np.asarray(probs, dtype=np.float64)
    c = p.shape[1]
    if c < 3:
        raise ConfigError([f"specialists need at least 3 classes (a group and a rest), the cache has {c}"])
    if k is not None and not 2 <= k <= c - 1:
        raise ConfigError([f"--specialists K must be in 2..{c - 1} for {c} classes, got {k}"])
    if classes_per_specialist is not None and not 2 <= classes_per_specialist <= c - 1:
        raise ConfigError([f"--classes-per-specialist must be in 2..{c - 1} for {c} classes, "
                           f"got {classes_per_specialist}"])
    columns = similarity_matrix(p, similarity).T  # row i = column i of the matrix: class i's profile
    weights = coprediction(p)
    np.fill_diagonal(weights, 0.0)
    ks = [k] if k is not None else (
        [math.ceil(c / classes_per_specialist)] if classes_per_specialist else list(range(2, c)))
    ks = [min(max(2, kk), c - 1) for kk in ks]
    scores: dict[int, float] = {}
    labels_by_k: dict[int, np.ndarray] = {}
    for kk in ks:
        labels_by_k[kk] = KMeans(n_clusters=kk, n_init=20, random_state=seed).fit(columns).labels_
        scores[kk] = modularity(weights, labels_by_k[kk])
    # The finest partition within MODULARITY_TOLERANCE of the best: a class the generalist hardly confuses with
    # anything adds almost nothing to modularity wherever it goes, so the best K would often attach it to some group
    # (and its specialist); a separate cluster leaves it to the generalist.
    top = max(scores.values())
    kk = max(k for k, v in scores.items() if v >= top - MODULARITY_TOLERANCE * abs(top))
    lab = labels_by_k[kk]
    groups = [sorted(int(i) for i in np.flatnonzero(lab == g)) for g in np.unique(lab)]
    y = labels if labels is not None else p.argmax(axis=1)
    confusion = [group_confusion(p, y, g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-confusion[i]["within"], groups[i]))
    groups, confusion = [groups[i] for i in order], [confusion[i] for i in order]
    return Clustering(groups=groups, specialists=[g for g in groups if len(g) >= 2], k=kk,
                      auto=k is None and classes_per_specialist is None, scores=scores, similarity=similarity,
                      confusion=confusion)


def group_confusion(probs: np.ndarray, labels: np.ndarray, group: list[int]) -> dict:
    """How confusable ``group`` is for the generalist (see :class:`Clustering`). probs (N, C), labels (N,)."""
    rows = np.isin(labels, group)
    if not rows.any():
        return {"rows": 0, "within": 0.0, "errors": 0, "errors_within": 0.0}
    p = probs[rows]
    y = labels[rows]
    mass_in = p[:, group].sum(axis=1)
    own = p[np.arange(len(y)), y]
    pred = p.argmax(axis=1)
    wrong = pred != y
    return {"rows": int(rows.sum()), "within": float((mass_in - own).mean()), "errors": int(wrong.sum()),
            "errors_within": float(np.isin(pred[wrong], group).mean()) if wrong.any() else 0.0}


def clusters_report(cl: Clustering, class_names: list[str]) -> str:
    """Readable markdown: the clusters, how confusable each is, and the modularity per K."""
    how = "automatic: the largest K within 0.5 % of the best modularity" if cl.auto else "given"
    lines = [f"# Class clusters ({cl.similarity} similarity, K = {cl.k}, {how})", "",
             "| cluster | classes | specialist | transfer rows | generalist's mean probability on the group's "
             "other classes | generalist errors on these rows | share of those errors inside the group |",
             "|---|---|---|---|---|---|---|"]
    for i, (g, conf) in enumerate(zip(cl.groups, cl.confusion, strict=True)):
        names = ", ".join(f"{class_names[c]} ({c})" for c in g)
        lines.append(f"| {i} | {names} | {'yes' if len(g) >= 2 else 'no (one class)'} | {conf['rows']} | "
                     f"{conf['within']:.4f} | {conf['errors']} | {conf['errors_within']:.1%} |")
    lines += ["", "Modularity of the co-prediction graph for each K tried: "
              + ", ".join(f"K={k}: {v:.4f}" for k, v in sorted(cl.scores.items())), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ class maps
def collapse_logits(logits: torch.Tensor, classes: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Logits whose softmax at T is ``softmax(logits / T)`` collapsed onto ``classes`` + a dustbin.

    ``w = [v_S, T · logsumexp(v_rest / T)]``: the kept classes keep their logits and the dustbin gets the
    log-sum-exp of the rest, so ``softmax(w / T)`` gives the kept classes their probability and the dustbin the sum
    of the others'. The existing ``kd`` loss then trains on the collapsed distribution at any T unchanged.

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
    """Log-probabilities (B, C) collapsed onto ``classes`` + dustbin: (B, m + 1), still normalised."""
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
        dustbin_correction: ``log(oversampling)`` added to the dustbin logit after training, where oversampling
            = (train odds of the specialist's classes) / (natural odds) =
            ``(train_fraction / (1 − train_fraction)) / (f / (1 − f))``.
    """

    rows: np.ndarray
    natural_fraction: float
    train_fraction: float
    dustbin_correction: float

    def summary(self) -> dict:
        return {"rows": int(self.rows.size), "natural_fraction": self.natural_fraction,
                "train_fraction": self.train_fraction, "dustbin_correction": self.dustbin_correction}


def sampling_plan(in_group: np.ndarray, seed: int, max_rows: int | None = None) -> SamplingPlan:
    """Choose a specialist's rows: every in-group row (at most ``max_rows // 2``) and as many from the rest.

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
        raise ConfigError([f"a specialist needs transfer rows both in its classes and outside them; found "
                           f"{inside.size} in and {outside.size} out"])
    half = inside.size if max_rows is None else min(inside.size, max(1, max_rows // 2))
    if half < inside.size:
        inside = rng.choice(inside, size=half, replace=False)
    # Without replacement while the rest is large enough (the paper's case: a specialist's classes are a small
    # part of the data); with replacement otherwise, so the split stays half and half.
    rest = rng.choice(outside, size=half, replace=outside.size < half)
    rows = np.sort(np.concatenate([inside, rest]))
    f = float(in_group.mean())
    t = 0.5  # by construction: as many rows from the rest as from the classes
    return SamplingPlan(rows, f, t, float(math.log((t / (1 - t)) / (f / (1 - f)))))


# -------------------------------------------------------------------------------------- initialisation
def _last_linear(model: nn.Module, width: int) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == width]
    if not found:
        raise CheckpointError(f"no final nn.Linear with {width} outputs in {type(model).__name__}; cannot resize "
                              "it for a specialist: use --init scratch")
    return found[-1]


@torch.no_grad()
def specialist_from_generalist(member: KDModel, classes: list[int], in_shape: tuple[int, ...]) -> KDModel:
    """A specialist with the generalist member's weights and a resized last layer.

    The last layer keeps the rows (weights and bias) of ``classes``; the dustbin row is the mean of the other
    classes' rows with ``log(C − m)`` added to its bias. Logits are linear in the features while the dustbin's ideal
    logit is ``logsumexp`` of the others'; ``mean + log(count)`` is the linear function closest to it (exact when
    the others are equal, a lower bound otherwise), so the specialist starts out predicting about what the
    generalist collapsed onto its classes predicts.

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
    state = {k: v for k, v in member.state_dict().items()
             if not k.startswith(f"body.{name}.") and k != "output_bias"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {f"body.{name}.weight", f"body.{name}.bias", "output_bias"}:
        raise CheckpointError(f"the generalist's weights do not fit {spec!r} for a specialist "
                              f"(missing {missing}, unexpected {unexpected}); use --init scratch")
    keep = torch.as_tensor(classes)
    rest = torch.ones(c, dtype=torch.bool)
    rest[keep] = False
    w, b = old_last.weight.cpu(), old_last.bias.cpu()
    new_last.weight.copy_(torch.cat([w[keep], w[rest].mean(0, keepdim=True)]))
    new_last.bias.copy_(torch.cat([b[keep], b[rest].mean(0, keepdim=True) + math.log(int(rest.sum()))]))
    new.train()
    return new


# ---------------------------------------------------------------------------------------- generalist data
def cached_generalist(cache: LogitCache, temperature: float = 1.0) -> torch.Tensor:
    """The cache's combined generalist logits (all members, mean-probs at T), (N, C) float32; needs a complete
    cache."""
    if not cache.complete:
        raise CacheError(f"{cache.location}: specialists need a complete cache; finish it with cache-logits")
    members = list(range(len(cache.members)))
    return torch.cat([combined_shard(cache, s, members, "mean-probs", temperature) for s in range(cache.n_shards)])


def transfer_set(cache: LogitCache, data_dir: str | None) -> Dataset:
    """Load the dataset behind a cache and check it is the one the cache was made on."""
    spec = cache.dataset.spec
    data = load_dataset(spec, data_dir)
    if data.fingerprint != cache.dataset.fingerprint:
        raise CacheError(f"the cache was made on {spec} with fingerprint {cache.dataset.fingerprint}, but {spec} "
                         f"now has fingerprint {data.fingerprint}; re-create the cache or restore the data")
    if not np.array_equal(data.ids, cache.read_ids()):
        raise CacheError(f"{cache.location}: the cache's sample ids differ from {spec}'s; the cache is damaged")
    return data


def generalist_members(cache: LogitCache, given: list[str] | None, device: torch.device | str = "cpu"
                       ) -> list[LoadedModel]:
    """Load the checkpoints of the cache's members (the generalist), checked by sha256.

    Args:
        cache: the generalist's cache.
        given: checkpoints / ensemble directories (``--generalist``); None: the paths the cache header records
            (as given, then relative to the directory above the cache's ``data/``).

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
                raise CheckpointError(f"the generalist's member {m.index} ({m.path}, recorded in the cache) was "
                                      "not found from here; pass --generalist PATH (its checkpoint or ensemble "
                                      "directory)")
            paths.append(hit)
    loaded = [load_checkpoint(p, device) for p in paths]
    have = [lm.sha256 for lm in loaded]
    if sorted(have) != sorted(want):
        raise CheckpointError("--generalist must be the checkpoints the cache was made with; the cache's members are "
                              + ", ".join(f"{m.path} ({m.checkpoint_sha256[:19]})" for m in cache.members)
                              + "; found " + ", ".join(f"{lm.path} ({lm.sha256[:19]})" for lm in loaded))
    by_sha = {lm.sha256: lm for lm in loaded}
    return [by_sha[s] for s in want]


# ------------------------------------------------------------------------------------------------ training
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


def train_specialist(task: SpecialistTask, log: Callable[[str], None] | None = None) -> dict:
    """Train one specialist through :func:`pipeline.training.fit` and save ``specialist.pt`` (a dask task).

    Returns:
        The specialist's record (classes, sampling plan, dustbin correction, history summary, seconds).
    """
    from pipeline.devices import resolve_device

    t0 = time.perf_counter()
    if task.torch_threads:
        torch.set_num_threads(task.torch_threads)
    device = resolve_device(task.device)
    cache = LogitCache(task.cache)
    data = transfer_set(cache, task.data_dir)
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
        member = load_checkpoint(task.init_checkpoint, "cpu")
        if task.init_sha256 and member.sha256 != task.init_sha256:
            raise CheckpointError(f"{task.init_checkpoint} has sha256 {member.sha256}, expected {task.init_sha256}")
        model = specialist_from_generalist(member.model, task.classes, data.sample_shape)
    else:
        model = build_model(task.model_spec, data.sample_shape, len(task.classes) + 1, data.input_stats)
    model = model.to(device)
    source = InMemorySource(data.x[plan.rows], hard, soft, batch_size=cfg.batch_size, seed=cfg.seed)
    out = Path(task.out)
    out.mkdir(parents=True, exist_ok=True)
    history = fit(model, source, make_loss("kd", task.temperature, alpha), cfg, device,
                  history_csv=out / "history.csv", log=log, desc=f"specialist {task.index}", progress=False)
    correction = plan.dustbin_correction if task.dustbin_correction else 0.0
    with torch.no_grad():
        model.output_bias.zero_()
        model.output_bias[-1] = correction
    names = cache.header.class_names
    record = {"index": task.index, "classes": task.classes, "class_names": [names[c] for c in task.classes],
              "model_spec": task.model_spec, "init": task.init_checkpoint or "scratch",
              "sampling": plan.summary(), "dustbin_correction_applied": correction,
              "temperature": task.temperature, "alpha": alpha, "train": cfg.to_dict(),
              "final_epoch": history[-1], "train_seconds": sum(r["seconds"] for r in history),
              "seconds": time.perf_counter() - t0}
    meta = {"model_spec": task.model_spec, "in_shape": list(data.sample_shape), "num_classes": len(task.classes) + 1,
            "class_names": [*record["class_names"], DUSTBIN],
            "dataset": {"spec": data.spec, "fingerprint": data.fingerprint},
            "cache": {"location": task.cache.display, "fingerprint": cache_fingerprint(cache.header)},
            "specialist": {k: v for k, v in record.items() if k != "final_epoch"}}
    save_checkpoint(out / "specialist.pt", model, meta)
    (out / "specialist.json").write_text(json.dumps(record, indent=2))
    return record


def run_tasks(tasks: list[SpecialistTask], workers: int, log: Callable[[str], None]) -> list[dict]:
    """Train specialists in this process (``workers`` <= 1) or as tasks on a dask ``LocalCluster`` of processes."""
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
            log(f"specialist {r['index']} ({', '.join(r['class_names'])}) done in {r['seconds']:.1f}s")
        return [records[t.index] for t in tasks]


# ----------------------------------------------------------------------------------------------- inference
def active_specialists(log_pg: torch.Tensor, groups: list[list[int]], top_n: int) -> torch.Tensor:
    """Which specialists are active: their classes meet the generalist's ``top_n`` classes. (N, C) -> (N, K) bool."""
    top = log_pg.topk(min(top_n, log_pg.shape[1]), dim=1).indices  # (N, n)
    member = torch.zeros(len(groups), log_pg.shape[1], dtype=torch.bool)
    for k, g in enumerate(groups):
        member[k, g] = True
    return member[:, top].any(dim=2).T  # (K, N, n) -> (N, K)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p ‖ q) from log-probabilities, 0·log 0 = 0. (B, C), (B, C) -> (B,)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)


def combination_objective(z: torch.Tensor, log_pg: torch.Tensor, log_ps: list[torch.Tensor],
                          groups: list[list[int]], active: torch.Tensor) -> torch.Tensor:
    """``KL(p_g ‖ q) + Σ_m active_m · KL(p_m ‖ q_m)`` per row, with q = softmax(z).

    Args:
        z: (N, C) logits of q. log_pg: (N, C) generalist log-probabilities.
        log_ps: per specialist m, (N, |S_m| + 1) log-probabilities (last column = dustbin).
        groups: per specialist, its classes S_m. active: (N, K) bool.

    Returns:
        (N,) objective values.
    """
    log_q = torch.log_softmax(z, dim=1)
    total = _kl_rows(log_pg, log_q)
    for m, (lp, g) in enumerate(zip(log_ps, groups, strict=True)):
        total = total + active[:, m].to(z.dtype) * _kl_rows(lp, collapse_log_probs(log_q, g))
    return total


def combine_distributions(log_pg: torch.Tensor, log_ps: list[torch.Tensor], groups: list[list[int]],
                          active: torch.Tensor, steps: int = 300, lr: float = 0.1) -> torch.Tensor:
    """The full distribution q minimising the combination objective, for every row at once.

    Gradient descent (Adam, learning rate decayed to 0 on a cosine) on q's logits from ``log p_g``. Rows are
    independent (the objective is a sum over rows and Adam's steps are per element), so one batch optimises each
    row as if alone. A row with no active specialist keeps q = p_g exactly (the optimum of KL(p_g ‖ q) alone).

    Args:
        log_pg: (N, C) generalist log-probabilities. log_ps, groups, active: as in :func:`combination_objective`.
        steps: gradient steps. lr: Adam's initial step size (in logit units).

    Returns:
        (N, C) log q.
    """
    out = torch.log_softmax(log_pg.detach().double(), dim=1)
    # Only rows with an active specialist are optimised: for the others q = p_g is the exact optimum, and Adam,
    # which rescales every gradient to about its step size, would turn rounding-level gradients into real steps.
    rows = active.to(torch.bool).any(dim=1)
    if steps == 0 or not bool(rows.any()):
        return out.float()
    lpg = out[rows]
    lps = [lp.detach().double()[rows] for lp in log_ps]
    act = active.to(torch.bool)[rows]
    z = lpg.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    # Decaying to 0 lets Adam settle instead of circling the optimum at its step size.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        combination_objective(z, lpg, lps, groups, act).sum().backward()
        opt.step()
        sched.step()
    out[rows] = torch.log_softmax(z.detach(), dim=1)
    return out.float()


# ---------------------------------------------------------------------------------------------- evaluation
def table4(gen_correct: np.ndarray, comb_correct: np.ndarray, covering: np.ndarray) -> list[dict]:
    """Accuracy gain by the number of active specialists covering the correct class (the paper's Table 4).

    Args:
        gen_correct, comb_correct: (N,) bool. covering: (N,) int.
    """
    rows = []
    for n in sorted(set(covering.tolist())):
        sel = covering == n
        g, c = int(gen_correct[sel].sum()), int(comb_correct[sel].sum())
        rows.append({"covering": int(n), "cases": int(sel.sum()), "generalist_correct": g, "combined_correct": c,
                     "gain": c - g, "relative_gain": (c - g) / g if g else float("nan")})
    return rows


def evaluate_combination(log_pg: torch.Tensor, spec_logits: list[torch.Tensor], corrections: list[float],
                         groups: list[list[int]], labels: torch.Tensor, top_n: int, steps: int, lr: float,
                         corrected: bool = True) -> dict:
    """Combine and measure one setting: accuracy, per class, Table 4, within-group specialist accuracy.

    Args:
        log_pg: (N, C). spec_logits: per specialist (N, m+1) logits *including* its dustbin correction.
        corrections: the dustbin correction each includes (subtracted when ``corrected`` is False).
        labels: (N,) int64.
    """
    c = log_pg.shape[1]
    log_ps = []
    for lg, corr in zip(spec_logits, corrections, strict=True):
        lg = lg.clone()
        if not corrected:
            lg[:, -1] -= corr
        log_ps.append(torch.log_softmax(lg, dim=1))
    active = active_specialists(log_pg, groups, top_n)
    log_q = combine_distributions(log_pg, log_ps, groups, active, steps, lr)
    gen = classification_metrics(log_pg, labels, c)
    comb = classification_metrics(log_q, labels, c)
    y = labels.numpy()
    member = np.zeros((len(groups), c), dtype=bool)
    for k, g in enumerate(groups):
        member[k, g] = True
    covering = (active.numpy() & member[:, y].T).sum(axis=1)
    gen_ok = log_pg.argmax(1).numpy() == y
    comb_ok = log_q.argmax(1).numpy() == y
    within = []
    for k, g in enumerate(groups):
        sel = np.isin(y, g)
        spec_pred = np.asarray(g)[log_ps[k][sel, :-1].argmax(1).numpy()]
        gen_pred = np.asarray(g)[log_pg[sel][:, g].argmax(1).numpy()]
        within.append({"classes": g, "cases": int(sel.sum()),
                       "specialist_within_accuracy": float((spec_pred == y[sel]).mean()),
                       "generalist_within_accuracy": float((gen_pred == y[sel]).mean()),
                       "active_share": float(active[torch.from_numpy(sel), k].float().mean())})
    return {"top_n": top_n, "dustbin_corrected": corrected, "generalist": gen, "combined": comb,
            "active_per_case": float(active.float().sum(1).mean()), "table4": table4(gen_ok, comb_ok, covering),
            "within_group": within, "changed": {"fixed": int((~gen_ok & comb_ok).sum()),
                                                "broken": int((gen_ok & ~comb_ok).sum())}}


def evaluation_report(result: dict, class_names: list[str]) -> str:
    """Markdown: generalist vs combined, per class, Table 4, specialists within their groups, sensitivity."""
    main = result["main"]
    g, c = main["generalist"], main["combined"]
    lines = [f"# Specialists on {result['dataset']}", "",
             f"Generalist: {result['generalist']}. {len(result['groups'])} specialist(s); a specialist is active "
             f"when its classes meet the generalist's top {main['top_n']}; combination by {result['kl_steps']} "
             f"Adam steps on q's logits; dustbin correction {'on' if main['dustbin_corrected'] else 'off'}.", "",
             "| model | errors | accuracy | NLL | ECE |", "|---|---|---|---|---|",
             f"| generalist | {g['errors']} | {g['accuracy']:.2%} | {g['nll']:.4f} | {g['ece']:.4f} |",
             f"| generalist + specialists | {c['errors']} | {c['accuracy']:.2%} | {c['nll']:.4f} | {c['ece']:.4f} |",
             "", f"Changed predictions: {main['changed']['fixed']} errors fixed, {main['changed']['broken']} "
             f"correct predictions broken (net {g['errors'] - c['errors']:+d} fewer errors); "
             f"{main['active_per_case']:.2f} active specialists per test case on average.", "",
             "## Specialists", "",
             "| specialist | classes | dustbin correction | training rows | test cases in its classes | "
             "active on them | within-group accuracy: generalist → specialist |", "|---|---|---|---|---|---|---|"]
    for k, (rec, w) in enumerate(zip(result["specialists"], main["within_group"], strict=True)):
        lines.append(f"| {k} | {', '.join(rec['class_names'])} | {rec['dustbin_correction_applied']:+.3f} | "
                     f"{rec['sampling']['rows']} | {w['cases']} | {w['active_share']:.1%} | "
                     f"{w['generalist_within_accuracy']:.2%} → {w['specialist_within_accuracy']:.2%} |")
    lines += ["", "## Per class (test errors)", "", "| class | cases | generalist | combined | change |",
              "|---|---|---|---|---|"]
    for i, name in enumerate(class_names):
        ge, ce = g["per_class_errors"][i], c["per_class_errors"][i]
        lines.append(f"| {name} | {g['per_class_n'][i]} | {ge} | {ce} | {ce - ge:+d} |")
    lines += ["", "## Table 4 view: by the number of active specialists covering the correct class", "",
              "| active specialists covering the correct class | test cases | generalist correct | combined correct "
              "| gain | relative accuracy change |", "|---|---|---|---|---|---|"]
    for r in main["table4"]:
        rel = "—" if math.isnan(r["relative_gain"]) else f"{r['relative_gain']:+.2%}"
        lines.append(f"| {r['covering']} | {r['cases']} | {r['generalist_correct']} | {r['combined_correct']} | "
                     f"{r['gain']:+d} | {rel} |")
    lines += ["", "## Sensitivity (test errors of the combination; generalist: "
              f"{g['errors']})", "", "| top-n | dustbin correction | errors | active per case |", "|---|---|---|---|"]
    for s in result["sensitivity"]:
        lines.append(f"| {s['top_n']} | {'on' if s['dustbin_corrected'] else 'off'} | {s['errors']} | "
                     f"{s['active_per_case']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def generalist_log_probs(members: list[LoadedModel], x: np.ndarray, device: torch.device) -> torch.Tensor:
    """The generalist's test-time log-probabilities: its members' mean-probs combination, as for the cache."""
    logits = torch.stack([predict_logits(m.model, x, device) for m in members])
    return torch.log_softmax(combine_members(logits, "mean-probs", 1.0), dim=1)


def check_groups(groups: list[list[int]], num_classes: int) -> None:
    """Specialist class sets must be valid, non-trivial subsets of the classes."""
    bad = [g for g in groups if len(g) < 1 or len(g) >= num_classes or min(g) < 0 or max(g) >= num_classes
           or len(set(g)) != len(g)]
    if bad or not groups:
        raise KDError(f"specialist class sets must be non-empty proper subsets of 0..{num_classes - 1}; found "
                      f"{groups}; re-run `kd-pipeline specialists cluster`")


# ------------------------------------------------------------------------------------------------- the steps
def _write_config(cfg: SpecialistsConfig, step: str) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"step": step, **cfg.to_dict()}, indent=2))


def _read_json(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise KDError(f"{path}: no {what} here; {fix}")
    return json.loads(path.read_text())


def _check_same_cache(recorded: str | None, cache: LogitCache, where: Path, step: str) -> None:
    """Clusters and specialists belong to the cache they were made from: refuse to mix them with another."""
    current = cache_fingerprint(cache.header)
    if recorded is not None and recorded != current:
        raise CacheError(f"{where} was made from a cache with fingerprint {recorded}, but --cache {cache.location} "
                         f"has {current}; re-run `kd-pipeline specialists {step}` for this cache, or use another --out")


def fit_clusters(cfg: SpecialistsConfig, log: Callable[[str], None] = print) -> Clustering:
    """Step 1: cluster the classes from the cache; writes ``clusters.json`` and ``clusters.md`` under ``cfg.out``."""
    cfg.validate()
    cache = LogitCache(cfg.cache_location)
    probs = torch.softmax(cached_generalist(cache, 1.0), dim=1).numpy()
    labels = cache.read_labels() if cache.labeled else None
    cl = cluster_classes(probs, labels, cfg.specialists, cfg.classes_per_specialist, cfg.similarity,
                         seed=cfg.train.seed)
    if not cl.specialists:
        raise KDError(f"no cluster holds two or more classes (clusters: {cl.groups}); ask for fewer clusters with "
                      "--specialists K")
    _write_config(cfg, "cluster")
    out = Path(cfg.out)
    (out / "clusters.json").write_text(json.dumps({"cache": cfg.cache,
                                                   "cache_fingerprint": cache_fingerprint(cache.header),
                                                   "class_names": list(cache.header.class_names),
                                                   **cl.to_dict()}, indent=2))
    report = clusters_report(cl, list(cache.header.class_names))
    (out / "clusters.md").write_text(report)
    log(report)
    return cl


def train_all(cfg: SpecialistsConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Step 2: train one specialist per cluster of two or more classes (dask tasks with ``--workers N``)."""
    cfg.validate()
    out = Path(cfg.out)
    clusters = _read_json(out / "clusters.json", "clusters",
                          "run `kd-pipeline specialists cluster` (or `specialists run`) first")
    location = cfg.cache_location
    cache = LogitCache(location)
    _check_same_cache(clusters.get("cache_fingerprint"), cache, out / "clusters.json", "cluster")
    check_groups(clusters["specialists"], cache.num_classes)
    if cfg.init_member >= len(cache.members):
        raise ConfigError([f"--init-member {cfg.init_member}: the cache has members 0..{len(cache.members) - 1}"])
    member_spec = cache.members[cfg.init_member].model_spec
    spec = cfg.model or member_spec
    init = cfg.init if cfg.init != "auto" else ("generalist" if spec == member_spec else "scratch")
    if init == "generalist" and spec != member_spec:
        raise ConfigError([f"--init generalist needs the specialists' model to be the generalist's ({member_spec}), "
                           f"got {spec}; use --init scratch or drop --model"])
    init_path = init_sha = None
    if init == "generalist":
        lm = generalist_members(cache, cfg.generalist)[cfg.init_member]
        init_path, init_sha = str(lm.path), lm.sha256
    _write_config(cfg, "train")
    tasks = [SpecialistTask(index=k, classes=list(g), cache=location, out=str(out / "specialists" / str(k)),
                            model_spec=spec, init_checkpoint=init_path, init_sha256=init_sha,
                            temperature=cfg.temperature, alpha=cfg.alpha,
                            train={**cfg.train.to_dict(), "seed": cfg.train.seed + k}, max_rows=cfg.max_rows,
                            data_dir=cfg.data_dir, device=cfg.device, dustbin_correction=cfg.dustbin_correction)
             for k, g in enumerate(clusters["specialists"])]
    log(f"training {len(tasks)} specialist(s) ({spec}, init {init}) "
        + (f"on a dask LocalCluster of {min(cfg.workers, len(tasks))} workers" if cfg.workers > 1 else "in-process"))
    t0 = time.perf_counter()
    records = run_tasks(tasks, cfg.workers, log)
    summary = {"specialists": records, "wall_seconds": time.perf_counter() - t0, "workers": cfg.workers,
               "init": init, "model": spec}
    (out / "specialists.json").write_text(json.dumps(summary, indent=2))
    for r in records:
        log(f"specialist {r['index']}: {', '.join(r['class_names'])} + dustbin, {r['sampling']['rows']} rows, "
            f"dustbin correction {r['dustbin_correction_applied']:+.3f}, {r['train_seconds']:.1f}s training")
    return records


def evaluate_all(cfg: SpecialistsConfig, log: Callable[[str], None] = print) -> dict:
    """Step 3: combine generalist and specialists on the test set; writes ``evaluation.json`` and ``report.md``."""
    from pipeline.datasets import default_eval_spec, load_eval_dataset
    from pipeline.devices import describe_device, resolve_device

    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    trained = _read_json(out / "specialists.json", "trained specialists",
                         "run `kd-pipeline specialists train` (or `specialists run`) first")
    device = resolve_device(cfg.device)
    cache = LogitCache(cfg.cache_location)
    data = transfer_set(cache, cfg.data_dir)
    spec = cfg.eval or default_eval_spec(data.spec)
    if not spec:
        raise ConfigError([f"no test split for {data.spec}; pass --eval SPEC (a labeled test set)"])
    test = load_eval_dataset(spec, cfg.data_dir, data, cache.num_classes)
    members = generalist_members(cache, cfg.generalist, device)
    log_pg = generalist_log_probs(members, test.x, device)
    groups, logits, corrections = [], [], []
    for r in trained["specialists"]:
        lm = load_checkpoint(out / "specialists" / str(r["index"]) / "specialist.pt", device)
        _check_same_cache(lm.meta.get("cache", {}).get("fingerprint"), cache, lm.path, "train")
        groups.append(lm.meta["specialist"]["classes"])
        corrections.append(float(lm.meta["specialist"]["dustbin_correction_applied"]))
        logits.append(predict_logits(lm.model, test.x, device))
    labels = torch.as_tensor(test.y)
    main = evaluate_combination(log_pg, logits, corrections, groups, labels, cfg.top_n, cfg.kl_steps, cfg.kl_lr)
    sensitivity = []
    for top_n in sorted({1, 2, 3, cfg.top_n}):
        for corrected in (True, False):
            r = main if (top_n, corrected) == (cfg.top_n, True) else evaluate_combination(
                log_pg, logits, corrections, groups, labels, top_n, cfg.kl_steps, cfg.kl_lr, corrected)
            sensitivity.append({"top_n": top_n, "dustbin_corrected": corrected, "errors": r["combined"]["errors"],
                                "active_per_case": r["active_per_case"]})
    result = {"dataset": test.spec, "generalist": f"{len(members)} member(s) of {cfg.cache} "
              f"({', '.join(sorted({m.meta['model_spec'] for m in members}))}, mean-probs)",
              "groups": groups, "specialists": trained["specialists"], "kl_steps": cfg.kl_steps, "kl_lr": cfg.kl_lr,
              "main": main, "sensitivity": sensitivity, "device": describe_device(device),
              "train_wall_seconds": trained.get("wall_seconds"), "evaluate_seconds": time.perf_counter() - t0}
    _write_config(cfg, "evaluate")
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    report = evaluation_report(result, list(cache.header.class_names))
    (out / "report.md").write_text(report)
    g, c = main["generalist"], main["combined"]
    log(f"generalist {g['errors']} errors ({g['accuracy']:.2%}), generalist + specialists {c['errors']} errors "
        f"({c['accuracy']:.2%}) on {test.spec}; wrote {out / 'report.md'}")
    return result


#: The steps of ``kd-pipeline specialists``, in the order ``run`` takes them.
STEPS: dict[str, Callable[[SpecialistsConfig, Callable[[str], None]], object]] = {
    "cluster": lambda cfg, log: fit_clusters(cfg, log).to_dict(),
    "train": train_all,
    "evaluate": evaluate_all,
}


def run_steps(cfg: SpecialistsConfig, steps: tuple[str, ...] = tuple(STEPS),
              log: Callable[[str], None] = print) -> dict:
    """Run the given steps in order; returns what each produced, by step name."""
    return {step: STEPS[step](cfg, log) for step in steps}
