"""What one reproduce directory shares: a teacher, a cache per transfer set, the students.

:class:`Run` calls the same steps a user would call (``train-teacher``, ``evaluate``,
``cache-logits``, ``train-student``) and reuses what an earlier invocation made when its recorded
config matches (a teacher by its recipe, a cache by cache-logits' own resume, a student by its
config and cache fingerprint), so re-running after an interruption continues where it stopped::

    OUT/
      teacher/                 the teacher ensemble (unless --teacher names an existing one)
      caches/<transfer>.zarr   one cache per transfer set
      runs/<experiment>/...    train-student run directories; sweeps/ for the temperature sweep
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.cache.config import CacheConfig
from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from pipeline.checkpoints import load_checkpoint
from pipeline.datasets import Dataset, load_dataset
from pipeline.devices import resolve_device
from pipeline.errors import ConfigError, KDError
from pipeline.evaluation import EvaluateConfig, evaluate_models
from pipeline.experiments.reproduce.recipes import (
    HOLDOUT,
    MAIN_RECIPE,
    QUICK_TEACHER,
    SCALES,
    TEACHERS,
    ReproduceConfig,
)
from pipeline.experiments.sweep import finished_result
from pipeline.files import slug
from pipeline.metrics import classification_metrics, predict_logits
from pipeline.models import build_model, trusting
from pipeline.training.config import StudentConfig, TeacherConfig
from pipeline.training.distill import train_student
from pipeline.training.teacher import recorded_config, train_teacher
from pipeline.training.train_config import TrainConfig


def check_against_data(cfg: ReproduceConfig, train: Dataset) -> None:
    """What needs the data to check, checked before any work: the class options (only when
    omitted-class runs: no other experiment reads them) and the student specs on its shape.

    Raises:
        ConfigError: every problem at once.
    """
    problems = []
    chosen = cfg.experiments()
    bad = [c for c in [cfg.omitted_class, *cfg.kept_classes] if not 0 <= c < train.num_classes]
    if bad and "omitted-class" in chosen:
        problems.append(
            f"--omitted-class / --kept-classes {bad}: {cfg.dataset} has classes "
            f"0..{train.num_classes - 1}"
        )
    students = [
        cfg.student,
        *([cfg.narrow_student] if "temperature" in chosen else []),
        *([cfg.main_student or MAIN_RECIPE.student] if "main-table" in chosen else []),
    ]
    for spec in students:
        try:  # a few ms: a typo must not cost a trained teacher
            build_model(spec, train.sample_shape, train.num_classes)
        except KDError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(problems)


class Run:
    """Shared artefacts of one reproduce directory, created on first use and reused after."""

    def __init__(self, cfg: ReproduceConfig, log: Callable[[str], None]) -> None:
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.scale = SCALES[cfg.scale]
        self.test_spec = f"{cfg.dataset}:test"
        train = load_dataset(f"{cfg.dataset}:train", cfg.data_dir)
        n_train = len(train)
        check_against_data(cfg, train)
        # quick: every transfer set is this share of its (class-filtered) training set.
        self.base_fraction = (
            min(1.0, self.scale.train_count / n_train) if self.scale.train_count else 1.0
        )
        self._teacher: str | None = None
        self.teacher_metrics: dict | None = None
        # Per student run directory: (wall seconds when it ran, made by an earlier invocation?).
        self.runs: dict[str, tuple[float, bool]] = {}
        self.recipe = (
            QUICK_TEACHER if cfg.scale == "quick" else TEACHERS.get(cfg.dataset, TEACHERS["other"])
        )

    def spec(self, fraction: float = 1.0, **class_filter: str | int | float) -> str:
        """A training-set spec: optional holdout / class filter, then a seeded subset (this scale's
        share x fraction)."""
        extra = "".join(f":{k}={v}" for k, v in class_filter.items())
        frac = self.base_fraction * fraction
        seeded = frac < 1 or "holdout" in class_filter
        return (
            f"{self.cfg.dataset}:train{extra}"
            + (f":fraction={frac:.6g}" if frac < 1 else "")
            + (f":seed={self.cfg.seed}" if seeded else "")
        )

    def teacher(self) -> str:
        """The teacher ensemble: --teacher, or the recipe's, trained once (a changed recipe retrains
        it)."""
        if self._teacher:
            return self._teacher
        if self.cfg.teacher:
            self._teacher = self.cfg.teacher
        else:
            r = self.recipe
            tdir = self.out / "teacher"
            tcfg = TeacherConfig(
                # Never the held-out rows: they choose the students' epochs (main-table) and fit
                # the omitted-class biases, and must be as new to the teacher as to them.
                dataset=self.spec(holdout=HOLDOUT),
                model=r.model,
                input_dropout=r.input_dropout,
                dropout=r.dropout,
                jitter=r.jitter,
                members=r.members,
                eval=self.test_spec,
                out=str(tdir),
                device=self.cfg.device,
                data_dir=self.cfg.data_dir,
                train=TrainConfig(epochs=r.epochs, seed=self.cfg.seed),
            )
            if (tdir / "ensemble.json").is_file():
                recorded = recorded_config(tdir)
                if recorded is None:
                    raise ConfigError(
                        [
                            f"{tdir / 'ensemble.json'} cannot be read; "
                            f"use another --out, or remove {tdir} to retrain"
                        ]
                    )
                if recorded.recipe() != tcfg.recipe():
                    # Never delete a finished teacher (and everything made from it) behind the
                    # user's back.
                    diffs = [
                        f"{k}: {recorded.recipe()[k]!r} there, {v!r} now"
                        for k, v in tcfg.recipe().items()
                        if recorded.recipe().get(k) != v
                    ]
                    raise ConfigError(
                        [
                            f"{tdir} holds a teacher trained with another recipe "
                            f"({'; '.join(diffs)}); "
                            "use another --out, or remove that directory to retrain"
                        ]
                    )
                self.log(f"reusing the teacher in {tdir}")
            else:
                self.log(f"training the teacher: {r.why}")
                train_teacher(tcfg, log=self.log)
            self._teacher = str(tdir)
        self.teacher_metrics = evaluate_models(
            EvaluateConfig(
                model=self._teacher,
                dataset=self.test_spec,
                device=self.cfg.device,
                data_dir=self.cfg.data_dir,
                trust_code=self.cfg.trust_code,
            )
        )
        return self._teacher

    def cache(self, spec: str) -> str:
        """The teacher's cache over a transfer set (cache-logits resumes a partial one, skips a
        complete one)."""
        location = self.out / "caches" / f"{slug(spec, sep='_', max_len=80)}.zarr"
        res = build_cache(
            CacheConfig(
                teachers=[self.teacher()],
                dataset=spec,
                out=str(location),
                device=self.cfg.device,
                data_dir=self.cfg.data_dir,
                command=f"kd-pipeline reproduce ({spec})",
                trust_code=self.cfg.trust_code,
            ),
            log=self.log,
            progress=False,
        )
        self.log(res.message)
        return str(location)

    def student(
        self,
        name: str,
        cache: str,
        temperature: float,
        alpha: float,
        epochs: int | None = None,
        student: str | None = None,
        seed: int | None = None,
        **extra: object,
    ) -> dict:
        """One train-student run under runs/<name>, reused when its config and cache fingerprint
        match."""
        scfg = StudentConfig(
            cache=cache,
            student=student or self.cfg.student,
            temperature=temperature,
            alpha=alpha,
            eval=self.test_spec,
            out=str(self.out / "runs" / name),
            device=self.cfg.device,
            data_dir=self.cfg.data_dir,
            overwrite=True,  # its own run directories
            train=TrainConfig(
                epochs=epochs or self.scale.student_epochs,
                seed=self.cfg.seed if seed is None else seed,
            ),
            **extra,
        )
        previous = finished_result(scfg, {"cache": cache_fingerprint(LogitCache(cache).header)})
        if previous is not None:
            self.log(f"reusing {scfg.out}")
            self.account(scfg.out, previous["metrics"]["wall_seconds"], reused=True)
            return previous
        self.log(
            f"training {name}: {scfg.student}, T={temperature:g}, alpha={alpha:g}, "
            f"seed {scfg.train.seed}"
        )
        result = train_student(scfg, log=lambda s: None, progress=False)
        self.account(scfg.out, result["metrics"]["wall_seconds"], reused=False)
        return result

    def account(self, run_dir: str, seconds: float, reused: bool) -> None:
        """Count a student run's recorded wall time once (the report says what its figures cost).

        A run two experiments share is counted
        once, as made now if this invocation made it: reusing it later in the same invocation
        does not make it a run from an earlier one.
        """
        self.runs.setdefault(str(run_dir), (seconds, reused))


def student_metrics(
    run: Run, result: dict, spec: str, offsets: dict[int, float] | None = None
) -> dict:
    """Metrics of a finished run's student on a labeled dataset; with ``offsets``, those replace the
    bias correction the student was saved with (e.g. the paper's +3.5 instead of the fitted
    offset)."""
    device = resolve_device(run.cfg.device)
    # The students' specs are the ones typed for this run (--student, --narrow-student).
    trust = trusting(
        run.cfg.trust_code,
        run.cfg.student,
        run.cfg.narrow_student,
        *([run.cfg.main_student] if run.cfg.main_student else []),
    )
    loaded = load_checkpoint(Path(result["config"]["out"]) / "student.pt", device, trust)
    if offsets is not None:
        with torch.no_grad():
            for c, v in result["metrics"]["bias"]["fitted"]["offsets"].items():
                loaded.model.output_bias[int(c)] -= v
            for c, v in offsets.items():
                loaded.model.output_bias[c] += v
    data = load_dataset(spec, run.cfg.data_dir)
    return classification_metrics(
        predict_logits(loaded.model, data.x, device),
        torch.as_tensor(data.y),
        int(loaded.meta["num_classes"]),
    )


def read_history(path: Path) -> list[dict]:
    """A run's ``history.csv``: one dict per epoch, numbers as floats (empty cells left out)."""
    with open(path) as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]
