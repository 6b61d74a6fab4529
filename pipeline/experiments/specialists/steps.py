"""The ``kd-pipeline specialists`` steps: each reads a config and the output directory, and
writes into it.

``cluster`` (:func:`fit_clusters`) -> ``clusters.json`` / ``clusters.md``; ``train``
(:func:`train_all`) -> ``specialists/<k>/specialist.pt`` and ``specialists.json``; ``evaluate``
(:func:`evaluate_all`) -> ``evaluation.json`` and ``report.md``; every step records
``config.json``. :data:`STEPS` lists them in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.checkpoints import load_checkpoint
from pipeline.datasets import resolve_eval_set
from pipeline.devices import describe_device, resolve_device
from pipeline.errors import CacheError, ConfigError, KDError
from pipeline.experiments.specialists.clustering import Clustering, cluster_classes, clusters_report
from pipeline.experiments.specialists.combine import (
    evaluate_combination,
    evaluation_report,
    generalist_log_probs,
)
from pipeline.experiments.specialists.config import SpecialistsConfig
from pipeline.experiments.specialists.specialist import (
    SpecialistTask,
    cached_generalist,
    generalist_members,
    run_tasks,
    transfer_set,
)
from pipeline.files import atomic_write_json, atomic_write_text
from pipeline.metrics import percent, predict_logits
from pipeline.models import check_trusted, trusting
from pipeline.runfile import write_run_file


def check_groups(groups: list[list[int]], num_classes: int) -> None:
    """Specialist class sets must be valid, non-trivial subsets of the classes."""
    bad = [
        g
        for g in groups
        if len(g) < 1
        or len(g) >= num_classes
        or min(g) < 0
        or max(g) >= num_classes
        or len(set(g)) != len(g)
    ]
    if bad or not groups:
        raise KDError(
            f"specialist class sets must be non-empty proper subsets of 0..{num_classes - 1}; "
            f"found {groups}; re-run `kd-pipeline specialists cluster`"
        )


# ---------------------------------------------------------------------------------------- the steps
def _write_config(cfg: SpecialistsConfig, step: str) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"step": step, **cfg.to_dict()})
    write_run_file(out, cfg)  # kd-pipeline specialists STEP --config OUT/config.toml replays it


def _read_json(path: Path, what: str, fix: str) -> dict:
    if not path.is_file():
        raise KDError(f"{path}: no {what} here; {fix}")
    return json.loads(path.read_text())


def _check_same_cache(recorded: str | None, cache: LogitCache, where: Path, step: str) -> None:
    """Clusters and specialists belong to the cache they were made from: refuse to mix them with
    another."""
    current = cache_fingerprint(cache.header)
    if recorded is not None and recorded != current:
        raise CacheError(
            f"{where} was made from a cache with fingerprint {recorded}, "
            f"but --cache {cache.location} has {current}; "
            f"re-run `kd-pipeline specialists {step}` for this cache, or use another --out"
        )


def fit_clusters(cfg: SpecialistsConfig, log: Callable[[str], None] = print) -> Clustering:
    """Step 1: cluster the classes from the cache; writes ``clusters.json`` and ``clusters.md``
    under ``cfg.out``."""
    cfg.validate()
    cache = LogitCache(cfg.cache_location)
    probs = torch.softmax(cached_generalist(cache, 1.0), dim=1).numpy()
    labels = cache.read_labels() if cache.labeled else None
    cl = cluster_classes(
        probs,
        labels,
        cfg.specialists,
        cfg.classes_per_specialist,
        cfg.similarity,
        seed=cfg.train.seed,
    )
    if not cl.specialists:
        raise KDError(
            f"no cluster holds two or more classes (clusters: {cl.groups}); "
            "ask for fewer clusters with --specialists K"
        )
    _write_config(cfg, "cluster")
    out = Path(cfg.out)
    # Atomic writes: a full disk leaves the previous file or none, never half of one.
    atomic_write_json(
        out / "clusters.json",
        {
            "cache": cfg.cache,
            "cache_fingerprint": cache_fingerprint(cache.header),
            "class_names": list(cache.header.class_names),
            **cl.to_dict(),
        },
    )
    report = clusters_report(cl, list(cache.header.class_names))
    atomic_write_text(out / "clusters.md", report)
    log(report)
    return cl


def train_all(cfg: SpecialistsConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Step 2: train one specialist per cluster of two or more classes (dask tasks with
    ``--workers N``)."""
    cfg.validate()
    out = Path(cfg.out)
    clusters = _read_json(
        out / "clusters.json",
        "clusters",
        "run `kd-pipeline specialists cluster` (or `specialists run`) first",
    )
    location = cfg.cache_location
    cache = LogitCache(location)
    _check_same_cache(clusters.get("cache_fingerprint"), cache, out / "clusters.json", "cluster")
    check_groups(clusters["specialists"], cache.num_classes)
    if cfg.init_member >= len(cache.members):
        raise ConfigError(
            [f"--init-member {cfg.init_member}: the cache has members 0..{len(cache.members) - 1}"]
        )
    member_spec = cache.members[cfg.init_member].model_spec
    spec = cfg.model or member_spec
    trust = trusting(cfg.trust_code, cfg.model)  # --model is typed, the cache's spec is recorded
    check_trusted(spec, trust, f"{location} (member {cfg.init_member})")
    init = cfg.init if cfg.init != "auto" else ("generalist" if spec == member_spec else "scratch")
    if init == "generalist" and spec != member_spec:
        raise ConfigError(
            [
                f"--init generalist needs the specialists' model to be the generalist's "
                f"({member_spec}), got {spec}; use --init scratch or drop --model"
            ]
        )
    init_path = init_sha = None
    if init == "generalist":
        lm = generalist_members(cache, cfg.generalist, trust_code=trust)[cfg.init_member]
        init_path, init_sha = str(lm.path), lm.sha256
    _write_config(cfg, "train")
    tasks = [
        SpecialistTask(
            index=k,
            classes=list(g),
            cache=location,
            out=str(out / "specialists" / str(k)),
            model_spec=spec,
            init_checkpoint=init_path,
            init_sha256=init_sha,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            train={**cfg.train.to_dict(), "seed": cfg.train.seed + k},
            max_rows=cfg.max_rows,
            data_dir=cfg.data_dir,
            device=cfg.device,
            dustbin_correction=cfg.dustbin_correction,
            trust_code=trust,
            dataset=cfg.dataset,
        )
        for k, g in enumerate(clusters["specialists"])
    ]
    log(
        f"training {len(tasks)} specialist(s) ({spec}, init {init}) "
        + (
            f"on a dask LocalCluster of {min(cfg.workers, len(tasks))} workers"
            if cfg.workers > 1
            else "in-process"
        )
    )
    t0 = time.perf_counter()
    records = run_tasks(tasks, cfg.workers, log)
    summary = {
        "specialists": records,
        "wall_seconds": time.perf_counter() - t0,
        "workers": cfg.workers,
        "init": init,
        "model": spec,
    }
    atomic_write_json(out / "specialists.json", summary)
    for r in records:
        log(
            f"specialist {r['index']}: {', '.join(r['class_names'])} + dustbin, "
            f"{r['sampling']['rows']} rows, "
            f"dustbin correction {r['dustbin_correction_applied']:+.3f}, "
            f"{r['train_seconds']:.1f}s training"
        )
    return records


def evaluate_all(cfg: SpecialistsConfig, log: Callable[[str], None] = print) -> dict:
    """Step 3: combine generalist and specialists on the test set; writes ``evaluation.json`` and
    ``report.md``."""
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    trained = _read_json(
        out / "specialists.json",
        "trained specialists",
        "run `kd-pipeline specialists train` (or `specialists run`) first",
    )
    device = resolve_device(cfg.device)
    cache = LogitCache(cfg.cache_location)
    data = transfer_set(cache, cfg.data_dir, cfg.dataset)
    test = resolve_eval_set(cfg.eval, data, cfg.data_dir, cache.num_classes, required=True)
    trust = trusting(cfg.trust_code, cfg.model)
    members = generalist_members(cache, cfg.generalist, device, trust)
    log(
        f"evaluating the generalist ({len(members)} member(s)) and "
        f"{len(trained['specialists'])} specialist(s) on {test.spec} ({len(test)} cases)"
    )
    log_pg = generalist_log_probs(members, test.x, device)
    groups, logits, corrections = [], [], []
    for r in trained["specialists"]:
        lm = load_checkpoint(out / "specialists" / str(r["index"]) / "specialist.pt", device, trust)
        _check_same_cache(lm.meta.get("cache", {}).get("fingerprint"), cache, lm.path, "train")
        groups.append(lm.meta["specialist"]["classes"])
        corrections.append(float(lm.meta["specialist"]["dustbin_correction_applied"]))
        logits.append(predict_logits(lm.model, test.x, device))
    labels = torch.as_tensor(test.y)
    # Every setting is a full combination (kl_steps of Adam over the test set): each is logged, so
    # a long evaluation shows where it is; the sensitivity table is the optional bulk of the work.
    settings = [(cfg.top_n, True)]  # the main result: the specialists as trained
    if cfg.sensitivity:
        settings += [
            (n, c)
            for n in sorted({1, 2, 3, cfg.top_n})
            for c in (True, False)
            if (n, c) != settings[0]
        ]
    results = {}
    for i, (top_n, corrected) in enumerate(settings, 1):
        t = time.perf_counter()
        results[top_n, corrected] = evaluate_combination(
            log_pg, logits, corrections, groups, labels, top_n, cfg.kl_steps, cfg.kl_lr, corrected
        )
        log(
            f"combination {i}/{len(settings)} (top-n {top_n}, dustbin correction "
            f"{'on' if corrected else 'off'}): {results[top_n, corrected]['combined']['errors']} "
            f"errors ({time.perf_counter() - t:.1f}s)"
        )
    main = results[settings[0]]
    sensitivity = (
        [
            {
                "top_n": n,
                "dustbin_corrected": c,
                "errors": r["combined"]["errors"],
                "active_per_case": r["active_per_case"],
            }
            for (n, c), r in sorted(results.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
        ]
        if cfg.sensitivity
        else []
    )
    result = {
        "dataset": test.spec,
        "generalist": f"{len(members)} member(s) of {cfg.cache} "
        f"({', '.join(sorted({m.meta['model_spec'] for m in members}))}, mean-probs)",
        "groups": groups,
        "specialists": trained["specialists"],
        "kl_steps": cfg.kl_steps,
        "kl_lr": cfg.kl_lr,
        "main": main,
        "sensitivity": sensitivity,
        "device": describe_device(device),
        "train_wall_seconds": trained.get("wall_seconds"),
        "evaluate_seconds": time.perf_counter() - t0,
    }
    _write_config(cfg, "evaluate")
    atomic_write_json(out / "evaluation.json", result)
    report = evaluation_report(result, list(cache.header.class_names))
    atomic_write_text(out / "report.md", report)
    g, c = main["generalist"], main["combined"]
    log(
        f"generalist {g['errors']} errors ({percent(g['accuracy'])}), "
        f"generalist + specialists {c['errors']} errors ({percent(c['accuracy'])}) "
        f"on {test.spec}; "
        f"wrote {out / 'report.md'}"
    )
    return result


#: The steps of ``kd-pipeline specialists``, in the order ``run`` takes them.
STEPS: dict[str, Callable[[SpecialistsConfig, Callable[[str], None]], object]] = {
    "cluster": lambda cfg, log: fit_clusters(cfg, log).to_dict(),
    "train": train_all,
    "evaluate": evaluate_all,
}


def run_steps(
    cfg: SpecialistsConfig,
    steps: tuple[str, ...] = tuple(STEPS),
    log: Callable[[str], None] = print,
) -> dict:
    """Run the given steps in order; returns what each produced, by step name."""
    return {step: STEPS[step](cfg, log) for step in steps}
