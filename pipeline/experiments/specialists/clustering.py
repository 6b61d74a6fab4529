"""Clustering the classes a generalist confuses (paper section 5, step 1), in numpy.

The generalist's predicted class probabilities ``p`` over the transfer set give the class-by-class
covariance; k-means (scikit-learn) clusters its columns. The raw covariance is ``E[p pᵀ] − π πᵀ``:
its off-diagonal is dominated by ``−π_i π_j`` (probabilities sum to one, so every pair of classes
covaries negatively) and each column by its diagonal, so k-means on it does not find confusable
groups (it did not on Fashion-MNIST). The default ``log-moment`` similarity clusters the columns of
``log E[p pᵀ]`` instead — the covariance plus ``π πᵀ`` (how much probability two classes get
*together*), on a log scale so that 1e-5 and 1e-2 co-predictions are told apart. ``covariance``
keeps the raw one. Automatic K: the largest K in 2..C-1 whose k-means partition comes within 0.5 %
of the best modularity of the co-prediction graph (weights ``E[p_i p_j]``, i ≠ j). Clusters of one
class get no specialist.

The similarities are a registry (:data:`SIMILARITIES`). This module imports nothing of the
library but its errors and the registry (numpy, no torch), so ``SpecialistsConfig`` can check
``similarity`` against it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.errors import ConfigError, MissingExtraError
from pipeline.registry import Registry

#: Similarity names -> ``matrix(p)``: (N, C) float64 probabilities -> the (C, C) matrix whose
#: columns k-means clusters; plug-ins from the entry point group ``kd_pipeline.similarities``.
SIMILARITIES: Registry[Callable[[np.ndarray], np.ndarray]] = Registry(
    "similarities", "similarity", lambda message: ConfigError([message])
)
MODULARITY_TOLERANCE = (
    0.005  # automatic K: the largest K whose modularity is within 0.5 % of the best
)


def coprediction(probs: np.ndarray) -> np.ndarray:
    """``E[p pᵀ]``: how much probability two classes get together. (N, C) -> (C, C), float64."""
    p = np.asarray(probs, dtype=np.float64)
    return p.T @ p / max(1, p.shape[0])


@SIMILARITIES.register("log-moment", "log E[p p^T]: how much probability classes get together")
def _log_moment(p: np.ndarray) -> np.ndarray:
    # The floor keeps never-co-predicted pairs finite (float16 caches give exact zeros).
    return np.log(np.maximum(coprediction(p), 1e-12))


@SIMILARITIES.register("covariance", "the raw covariance of the predicted probabilities")
def _covariance(p: np.ndarray) -> np.ndarray:
    return np.cov(p, rowvar=False)


def similarity_matrix(probs: np.ndarray, kind: str = "log-moment") -> np.ndarray:
    """The (C, C) matrix whose columns k-means clusters (see the module docstring for why
    ``log-moment``): (N, C) probabilities -> (C, C) float64."""
    return SIMILARITIES.get(kind)(np.asarray(probs, dtype=np.float64))


def modularity(weights: np.ndarray, labels: np.ndarray) -> float:
    """Newman modularity of a partition of a weighted graph ((C, C) symmetric weights, zero
    diagonal)."""
    total = float(weights.sum())
    if total <= 0:
        return 0.0
    degree = weights.sum(axis=0)
    q = 0.0
    for g in np.unique(labels):
        inside = labels == g
        q += (
            float(weights[np.ix_(inside, inside)].sum()) / total
            - (float(degree[inside].sum()) / total) ** 2
        )
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
        confusion: per group: ``within`` = mean probability the generalist gives to the group's
            *other* classes on rows labeled in the group, ``errors_within`` = share of its errors on
            those rows that stay in the group, ``rows``.
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
        return cls(
            groups=d["groups"],
            specialists=d["specialists"],
            k=d["k"],
            auto=d["auto"],
            scores={int(k): v for k, v in d["scores"].items()},
            similarity=d["similarity"],
            confusion=d.get("confusion", []),
        )


def cluster_classes(
    probs: np.ndarray,
    labels: np.ndarray | None = None,
    k: int | None = None,
    classes_per_specialist: int | None = None,
    similarity: str = "log-moment",
    seed: int = 0,
) -> Clustering:
    """Cluster classes by the generalist's confusions.

    Args:
        probs: (N, C) the generalist's predicted probabilities on the transfer set.
        labels: (N,) labels (for the confusion report), or None: the generalist's argmax stands in.
        k: number of clusters; None: ``ceil(C / classes_per_specialist)`` if that is given, else
            automatic.
        classes_per_specialist: the typical specialist size N (sets K = ceil(C / N)).
        similarity: ``log-moment`` (default) or ``covariance`` (the paper's raw matrix).
        seed: k-means seed.

    Returns:
        The clustering (see :class:`Clustering`).
    """
    try:  # local: the rest of the library does not need scikit-learn (the specialists extra)
        from sklearn.cluster import KMeans
    except ImportError:
        raise MissingExtraError(
            "clustering classes for specialists", "scikit-learn", "specialists"
        ) from None

    p = np.asarray(probs, dtype=np.float64)
    c = p.shape[1]
    if c < 3:
        raise ConfigError(
            [f"specialists need at least 3 classes (a group and a rest), the cache has {c}"]
        )
    if k is not None and not 2 <= k <= c - 1:
        raise ConfigError([f"--specialists K must be in 2..{c - 1} for {c} classes, got {k}"])
    if classes_per_specialist is not None and not 2 <= classes_per_specialist <= c - 1:
        raise ConfigError(
            [
                f"--classes-per-specialist must be in 2..{c - 1} for {c} classes, "
                f"got {classes_per_specialist}"
            ]
        )
    columns = similarity_matrix(
        p, similarity
    ).T  # row i = column i of the matrix: class i's profile
    weights = coprediction(p)
    np.fill_diagonal(weights, 0.0)
    ks = (
        [k]
        if k is not None
        else (
            [math.ceil(c / classes_per_specialist)] if classes_per_specialist else list(range(2, c))
        )
    )
    ks = [min(max(2, kk), c - 1) for kk in ks]
    scores: dict[int, float] = {}
    labels_by_k: dict[int, np.ndarray] = {}
    for kk in ks:
        labels_by_k[kk] = KMeans(n_clusters=kk, n_init=20, random_state=seed).fit(columns).labels_
        scores[kk] = modularity(weights, labels_by_k[kk])
    # The finest partition within MODULARITY_TOLERANCE of the best: a class the generalist hardly
    # confuses with anything adds almost nothing to modularity wherever it goes, so the best K would
    # often attach it to some group (and its specialist); a separate cluster leaves it to the
    # generalist.
    top = max(scores.values())
    kk = max(k for k, v in scores.items() if v >= top - MODULARITY_TOLERANCE * abs(top))
    lab = labels_by_k[kk]
    groups = [sorted(int(i) for i in np.flatnonzero(lab == g)) for g in np.unique(lab)]
    y = labels if labels is not None else p.argmax(axis=1)
    confusion = [group_confusion(p, y, g) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-confusion[i]["within"], groups[i]))
    groups, confusion = [groups[i] for i in order], [confusion[i] for i in order]
    return Clustering(
        groups=groups,
        specialists=[g for g in groups if len(g) >= 2],
        k=kk,
        auto=k is None and classes_per_specialist is None,
        scores=scores,
        similarity=similarity,
        confusion=confusion,
    )


def group_confusion(probs: np.ndarray, labels: np.ndarray, group: list[int]) -> dict:
    """How confusable ``group`` is for the generalist (see :class:`Clustering`).
    probs (N, C), labels (N,)."""
    rows = np.isin(labels, group)
    if not rows.any():
        return {"rows": 0, "within": 0.0, "errors": 0, "errors_within": 0.0}
    p = probs[rows]
    y = labels[rows]
    mass_in = p[:, group].sum(axis=1)
    own = p[np.arange(len(y)), y]
    pred = p.argmax(axis=1)
    wrong = pred != y
    return {
        "rows": int(rows.sum()),
        "within": float((mass_in - own).mean()),
        "errors": int(wrong.sum()),
        "errors_within": float(np.isin(pred[wrong], group).mean()) if wrong.any() else 0.0,
    }


def clusters_report(cl: Clustering, class_names: list[str]) -> str:
    """Readable markdown: the clusters, how confusable each is, and the modularity per K."""
    how = "automatic: the largest K within 0.5 % of the best modularity" if cl.auto else "given"
    lines = [
        f"# Class clusters ({cl.similarity} similarity, K = {cl.k}, {how})",
        "",
        "| cluster | classes | specialist | transfer rows "
        "| generalist's mean probability on the group's other classes "
        "| generalist errors on these rows | share of those errors inside the group |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (g, conf) in enumerate(zip(cl.groups, cl.confusion, strict=True)):
        names = ", ".join(f"{class_names[c]} ({c})" for c in g)
        lines.append(
            f"| {i} | {names} | {'yes' if len(g) >= 2 else 'no (one class)'} | {conf['rows']} | "
            f"{conf['within']:.4f} | {conf['errors']} | {conf['errors_within']:.1%} |"
        )
    lines += [
        "",
        "Modularity of the co-prediction graph for each K tried: "
        + ", ".join(f"K={k}: {v:.4f}" for k, v in sorted(cl.scores.items())),
        "",
    ]
    return "\n".join(lines)
