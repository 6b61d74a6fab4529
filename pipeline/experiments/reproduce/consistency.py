"""The consistency experiment: one student trained from view caches and by online distillation.

The same student, epochs and seeds are trained from caches of one or several augmented views of
each sample and with online distillation, over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.experiments.reproduce.artefacts import Run
from pipeline.experiments.reproduce.sections import Section, timed_cache
from pipeline.experiments.sweep import finished_result
from pipeline.files import slug
from pipeline.training.config import StudentConfig
from pipeline.training.distill import train_student
from pipeline.training.train_config import TrainConfig


# ------------------------------------------------------------------------------------ consistency
@dataclass(kw_only=True)
class Consistency(Section):
    """Augmentation consistency: the same student, epochs and seeds trained six ways.

    ``arms`` maps an arm's label to ``{kind, views, mode, seeds: [metrics], errors_mean,
    errors_std, nll_mean, ece_mean, wall_mean, teacher_seconds, bytes}``; ``wall_mean`` is the mean
    student run plus, for cached arms, the time its cache took to write (the teacher's time).
    """

    spec: str
    augment: str
    epochs: int
    seeds: list[int]
    temperature: float
    alpha: float
    arms: dict
    online_label: str
    best_view_label: str | None

    def figures(self) -> dict:
        return {"arms": self.arms, "best_view_cache": self.best_view_label}


def _consistency_run(run: Run, name: str, seed: int, **options: object) -> dict:
    """One student of an arm (reused when its config and soft targets match)."""
    cfg = run.cfg
    scfg = StudentConfig(
        student=cfg.student,
        temperature=cfg.temperature,
        alpha=options.pop("alpha", cfg.alpha),  # type: ignore[arg-type]
        eval=run.test_spec,
        out=str(run.out / "runs" / "consistency" / f"{name}-s{seed}"),
        device=cfg.device,
        data_dir=cfg.data_dir,
        overwrite=True,
        train=TrainConfig(epochs=run.scale.student_epochs, seed=seed),
        **options,  # type: ignore[arg-type]
    )
    ident = (
        {"cache": cache_fingerprint(LogitCache(scfg.cache).header)}
        if scfg.cache
        else {"online_teacher": None}
    )
    previous = finished_result(scfg, ident) if scfg.cache else None
    if previous is not None:
        run.account(scfg.out, previous["metrics"]["wall_seconds"], reused=True)
        return previous
    run.log(f"training consistency/{name} seed {seed}")
    result = train_student(scfg, log=lambda s: None, progress=False)
    run.account(scfg.out, result["metrics"]["wall_seconds"], reused=False)
    return result


def consistency(run: Run) -> Consistency:
    """Hard labels + live augmentation, a single-view cache + live augmentation (inconsistent),
    view caches with K views (consistent), and online KD with live augmentation, over seeds."""
    cfg, s = run.cfg, run.scale
    spec = run.spec()
    aug = cfg.augment
    plain, plain_s, plain_b = timed_cache(run, spec, 1, None)
    arms: list[tuple[str, str, int | None, float, int, dict]] = [
        ("hard labels + live augmentation", plain, None, 0.0, 0, {"alpha": 0.0, "augment": aug}),
        ("single-view cache + live augmentation", plain, None, plain_s, plain_b, {"augment": aug}),
    ]
    for k in cfg.views:
        loc, secs, size = timed_cache(run, spec, k, aug)
        arms.append((f"view cache K = {k}", loc, k, secs, size, {}))
    online_label = "online KD + live augmentation"
    out: dict = {}
    for label, cache, k, teacher_s, size, opts in arms:
        results = [
            _consistency_run(run, slug(label), seed, cache=cache, **dict(opts))
            for seed in cfg.seeds
        ]
        out[label] = _arm(results, "cache", k, teacher_s, size)
    online = [
        _consistency_run(
            run,
            "online",
            seed,
            online_teacher=[run.teacher()],
            dataset=spec,
            augment=aug,
            trust_code=cfg.trust_code,
        )
        for seed in cfg.seeds
    ]
    out[online_label] = _arm(online, "online", None, 0.0, 0)
    ref = out[online_label]
    inconsistent = out["single-view cache + live augmentation"]
    view_labels = [label for label, *_ in arms if label.startswith("view cache")]
    met = [
        lab
        for lab in view_labels
        if out[lab]["errors_mean"] <= 1.01 * ref["errors_mean"]
        and out[lab]["wall_mean"] < 0.5 * ref["wall_mean"]
    ]
    best = min(view_labels, key=lambda lab: out[lab]["errors_mean"]) if view_labels else None
    better = best is not None and out[best]["errors_mean"] < inconsistent["errors_mean"] - max(
        inconsistent["errors_std"], out[best]["errors_std"]
    )
    holds = bool(met) and better
    if best is None:
        verdict = "no view cache was run"
    else:
        b = out[best]
        verdict = (
            f"{'holds' if holds else 'does not hold here'}: best {best} "
            f"{b['errors_mean']:.1f} errors in {b['wall_mean']:.0f} s vs online KD "
            f"{ref['errors_mean']:.1f} in {ref['wall_mean']:.0f} s and the inconsistent "
            f"baseline {inconsistent['errors_mean']:.1f} (mean of {len(cfg.seeds)} seeds)"
        )
    return Consistency(
        name="consistency",
        holds=holds,
        verdict=verdict,
        spec=spec,
        augment=aug,
        epochs=s.student_epochs,
        seeds=list(cfg.seeds),
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        arms=out,
        online_label=online_label,
        best_view_label=best,
    )


def _arm(results: list[dict], kind: str, views: int | None, teacher_s: float, size: int) -> dict:
    """Mean and spread over seeds of one arm's runs."""
    tests = [r["metrics"]["test"] for r in results]
    errors = np.array([t["errors"] for t in tests], float)
    walls = np.array([r["metrics"]["wall_seconds"] for r in results], float)
    return {
        "kind": kind,
        "views": views,
        "mode": results[0].get("views", {}).get("mode"),
        "errors": errors.tolist(),
        "errors_mean": float(errors.mean()),
        "errors_std": float(errors.std(ddof=1)) if len(errors) > 1 else 0.0,
        "nll_mean": float(np.mean([t["nll"] for t in tests])),
        "ece_mean": float(np.mean([t["ece"] for t in tests])),
        "n_test": tests[0]["n"],
        "student_seconds_mean": float(walls.mean()),
        "teacher_seconds": teacher_s,
        "wall_mean": float(walls.mean()) + teacher_s,
        "bytes": size,
    }
