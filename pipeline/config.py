"""Config dataclasses for each step. Each ``validate()`` reports every problem at once (``ConfigError``).

Configs are plain data: the CLI fills them, the steps read them, and ``to_dict()`` is what runs record as their
resolved config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.models import with_options
from pipeline.training.loop import TrainConfig

if TYPE_CHECKING:
    from pipeline.cache.location import CacheLocation
from pipeline.training.losses import ENSEMBLE_METHODS, LOSSES

CACHE_DTYPES = ("float16", "float32")


def _raise_all(problems: list[str], train: TrainConfig | None = None) -> None:
    """Raise one ``ConfigError`` with ``problems`` plus the training settings' own, if there are any."""
    if train is not None:
        try:
            train.validate()
        except ConfigError as e:
            problems = [*problems, *e.problems]
    if problems:
        raise ConfigError(problems)


@dataclass
class TeacherConfig:
    """``train-teacher``: an ensemble of ``members`` models, one seed each."""

    dataset: str = "fashion-mnist:train"
    model: str = "mlp:1200,1200"
    input_dropout: float | None = None  # mlp only; None = the paper's 0.2
    dropout: float | None = None  # mlp (None = the paper's 0.5) and cnn (None = its own default)
    max_norm: float | None = None  # mlp only
    jitter: int = 2
    members: int = 3
    eval: str | None = None  # None: the training set's test split; "": no evaluation
    out: str = ""
    device: str = "auto"
    data_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        problems = []
        if self.members < 1:
            problems.append(f"members must be >= 1, got {self.members}")
        if self.jitter < 0:
            problems.append(f"jitter must be >= 0 pixels, got {self.jitter}")
        for name in ("input_dropout", "dropout"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                problems.append(f"{name} must be in [0, 1), got {v}")
        kind = self.model.partition(":")[0]
        if kind != "mlp" and (self.input_dropout is not None or self.max_norm is not None):
            problems.append(f"--input-dropout and --max-norm apply to mlp models, not {kind}; put the model's own "
                            "options in its spec")
        if kind not in ("mlp", "cnn") and self.dropout is not None:
            problems.append(f"--dropout applies to mlp and cnn models, not {kind}")
        if not self.out:
            problems.append("out (the ensemble directory) must be given")
        _raise_all(problems, self.train)

    def recipe(self) -> dict:
        """What defines the trained teacher: the config without where it is written, evaluated or run.

        Re-use compares this, so ``--out`` spelled relative vs absolute, ``--device`` or ``--data-dir`` do not
        make an existing teacher look different.
        """
        d = self.to_dict()
        for key in ("out", "device", "data_dir", "eval"):
            d.pop(key)
        return d

    def model_spec(self) -> str:
        """The model spec with the dropout / max-norm options resolved into it (the paper's defaults for mlp)."""
        kind = self.model.partition(":")[0]
        if kind == "mlp":
            own = {p.partition("=")[0] for p in self.model.split(":")[1:] if "=" in p}

            def pick(key: str, flag: float | None, paper: float) -> float | None:
                # The flag wins; else the spec's own value stays; else the paper's default.
                return flag if flag is not None else (None if key in own else paper)

            return with_options(self.model, input_dropout=pick("input_dropout", self.input_dropout, 0.2),
                                dropout=pick("dropout", self.dropout, 0.5), max_norm=self.max_norm)
        if kind == "cnn":
            return with_options(self.model, dropout=self.dropout)
        return self.model

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluateConfig:
    """``evaluate``: test metrics of a checkpoint or an ensemble on a labeled dataset."""

    model: str = ""
    dataset: str = "fashion-mnist:test"
    ensemble: str = "mean-probs"
    batch_size: int = 1024
    device: str = "auto"
    data_dir: str | None = None

    def validate(self) -> None:
        problems = []
        if not self.model:
            problems.append("model (a checkpoint or ensemble directory) must be given")
        if self.ensemble not in ENSEMBLE_METHODS:
            problems.append(f"ensemble must be one of {', '.join(ENSEMBLE_METHODS)}, got {self.ensemble!r}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if problems:
            raise ConfigError(problems)


def redact_secrets(options: dict) -> dict:
    """``options`` with values of credential-like keys (key, secret, token, password) replaced by ``"***"``."""
    out = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact_secrets(v)
        else:
            secret = any(w in k.lower() for w in ("key", "secret", "token", "password"))
            out[k] = "***" if secret else v
    return out


@dataclass
class CacheConfig:
    """``cache-logits``: run teachers once over a transfer set into a Zarr cache."""

    teachers: list[str] = field(default_factory=list)
    dataset: str = "fashion-mnist:train"
    out: str = ""
    dtype: str | None = None  # None: the existing cache's, or float16 for a new one
    batch_size: int = 1024
    rows_per_shard: int | None = None  # None: the existing cache's, or 4096 for a new one
    device: str = "auto"
    workers: int = 0
    scheduler: str | None = None
    add_member: bool = False
    data_dir: str | None = None
    command: str = ""
    storage_options: dict = field(default_factory=dict)  # fsspec options for an s3:// --out (endpoint_url, ...)

    def validate(self) -> None:
        problems = []
        if not self.teachers:
            problems.append("at least one --teacher (checkpoint or ensemble directory) is needed")
        if not self.out:
            problems.append("--out CACHE must be given")
        if self.dtype is not None and self.dtype not in CACHE_DTYPES:
            problems.append(f"dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            problems.append(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.workers and self.scheduler:
            problems.append("use --workers N or --scheduler ADDRESS, not both")
        if problems:
            raise ConfigError(problems)

    @property
    def location(self) -> CacheLocation:
        """The cache this run writes (``out`` with its storage options), resolved once."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(self.out, self.storage_options)


@dataclass
class StudentConfig:
    """``train-student``: distil a student from a cache (or an online teacher)."""

    cache: str = ""
    student: str = "mlp:800,800"
    temperature: float = 20.0
    alpha: float = 0.9
    loss: str = "kd"
    ensemble: str = "mean-probs"
    members: list[int] | None = None
    eval: str | None = None
    class_bias: dict[int, float] = field(default_factory=dict)
    fit_bias_on: str | None = None
    memory_budget: int = 2 << 30
    allow_partial: bool = False
    online_teacher: list[str] | None = None
    dataset: str | None = None  # the transfer set for --online-teacher (a cache records its own)
    out: str = ""
    device: str = "auto"
    data_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    storage_options: dict = field(default_factory=dict)  # fsspec options for an s3:// --cache

    def validate(self) -> None:
        problems = []
        if not self.cache and not self.online_teacher:
            problems.append("--cache CACHE (or --online-teacher PATH with --dataset) must be given")
        if self.cache and self.online_teacher:
            problems.append("use --cache or --online-teacher, not both")
        if self.online_teacher and not self.dataset:
            problems.append("--online-teacher needs --dataset SPEC (the transfer set)")
        if self.members is not None and (not self.members or min(self.members) < 0):
            problems.append(f"members must be non-negative member indices, got {self.members}")
        if self.members is not None and len(set(self.members)) != len(self.members):
            problems.append(f"members must not repeat (a repeat would weigh a member twice), got {self.members}")
        if self.cache and self.dataset:
            problems.append("--dataset is for --online-teacher; a cache trains on the dataset it records")
        if self.online_teacher and (self.members is not None or self.allow_partial):
            problems.append("--members and --allow-partial select cache members and shards; they do not apply to "
                            "--online-teacher")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.ensemble not in ENSEMBLE_METHODS:
            problems.append(f"ensemble must be one of {', '.join(ENSEMBLE_METHODS)}, got {self.ensemble!r}")
        if self.memory_budget < 1 << 20:
            problems.append(f"memory_budget must be at least 1 MiB, got {self.memory_budget} bytes")
        if not self.out:
            problems.append("out (the run directory) must be given")
        _raise_all(problems, self.train)

    @property
    def cache_location(self) -> CacheLocation | None:
        """The cache this run reads, resolved once; None for an online teacher."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(self.cache, self.storage_options) if self.cache else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_bias"] = {str(k): v for k, v in self.class_bias.items()}
        d["storage_options"] = redact_secrets(self.storage_options)  # runs are shared; credentials are not
        return d


def setting_name(student: str, temperature: float, alpha: float, seed: int) -> str:
    """A sweep setting's run-directory name, e.g. ``mlp-800-800-T4-a0.9-s0``."""
    slug = student.replace(":", "-").replace(",", "-").replace("/", "_").replace("=", "")
    return f"{slug}-T{temperature:g}-a{alpha:g}-s{seed}"


@dataclass
class SweepConfig:
    """``sweep``: the cross product students x temperatures x alphas x seeds, each setting one ``train-student``.

    Every setting runs :func:`pipeline.distill.train_student` with a :class:`StudentConfig` made from these fields
    (``make_student_config``), so a sweep row and a ``train-student`` run with the same options are the same run.
    """

    cache: str = ""
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 20.0])
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.9, 1.0])
    students: list[str] = field(default_factory=lambda: ["mlp:800,800"])
    seeds: list[int] = field(default_factory=lambda: [0])
    loss: str = "kd"
    ensemble: str = "mean-probs"
    members: list[int] | None = None
    eval: str | None = None
    memory_budget: int = 2 << 30
    online_teacher: list[str] | None = None  # baseline: every setting distils from a live teacher instead
    dataset: str | None = None  # the transfer set for online_teacher
    workers: int | None = None  # None: 2 (or the scheduler's workers); 0: one after another in this process
    scheduler: str | None = None
    torch_threads: int = 0  # per worker; 0: the machine's cores divided by the workers
    out: str = ""
    device: str = "auto"
    data_dir: str | None = None
    storage_options: dict = field(default_factory=dict)  # fsspec options for an s3:// --cache
    train: TrainConfig = field(default_factory=TrainConfig)  # its seed is replaced by each setting's

    def validate(self) -> None:
        problems = []
        for name in ("temperatures", "alphas", "students", "seeds"):
            values = getattr(self, name)
            if not values:
                problems.append(f"{name} must have at least one value")
            elif len(set(values)) != len(values):
                problems.append(f"{name} has repeated values: {values}")
        problems += [f"temperature must be > 0, got {t}" for t in self.temperatures if not t > 0]
        problems += [f"alpha must be in [0, 1], got {a}" for a in self.alphas if not 0 <= a <= 1]
        if self.workers is not None and self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.workers is not None and self.scheduler:
            problems.append("use --workers N or --scheduler ADDRESS, not both")
        if self.torch_threads < 0:
            problems.append(f"torch_threads must be >= 0, got {self.torch_threads}")
        if not self.out:
            problems.append("--out SWEEP_DIR must be given")
        names: dict[str, tuple] = {}
        for st in self.students:
            for t in self.temperatures:
                for al in self.alphas:
                    name = setting_name(st, t, al, 0)
                    if name in names and names[name] != (st, t, al):
                        problems.append(f"settings {names[name]} and {(st, t, al)} would share the run directory "
                                        f"{name}; make the student specs or values distinguishable")
                    names[name] = (st, t, al)
        # Everything a single run would refuse, reported once for the whole grid.
        probe = self.student_config(self.students[0] if self.students else "mlp:8", 1.0, 0.5, 0, out="probe")
        try:
            probe.validate()
        except ConfigError as e:
            problems += [p for p in e.problems if not p.startswith(("temperature", "alpha"))]
        if problems:
            raise ConfigError(problems)

    def student_config(self, student: str, temperature: float, alpha: float, seed: int, out: str) -> StudentConfig:
        """The one-run config of a setting: exactly what ``train-student`` would build from the same options."""
        return StudentConfig(cache=self.cache, student=student, temperature=temperature, alpha=alpha, loss=self.loss,
                             ensemble=self.ensemble, members=self.members, eval=self.eval,
                             memory_budget=self.memory_budget, online_teacher=self.online_teacher,
                             dataset=self.dataset, out=out, device=self.device, data_dir=self.data_dir,
                             storage_options=self.storage_options, train=replace(self.train, seed=seed))

    @property
    def cache_location(self) -> CacheLocation | None:
        """The cache every setting reads, resolved once; None for an online teacher."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(self.cache, self.storage_options) if self.cache else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["storage_options"] = redact_secrets(self.storage_options)
        return d


SPECIALIST_INITS = ("auto", "generalist", "scratch")


@dataclass
class SpecialistsConfig:
    """``specialists``: cluster the classes, train one specialist per confusable cluster, combine at test time."""

    cache: str = ""
    out: str = ""
    generalist: list[str] | None = None  # the cache members' checkpoints; None: the paths the cache records
    specialists: int | None = None  # K clusters; None: --classes-per-specialist, else automatic
    classes_per_specialist: int | None = None
    similarity: str = "log-moment"
    model: str | None = None  # None: the generalist members' spec (then initialised from member init_member)
    init: str = "auto"
    init_member: int = 0
    temperature: float = 4.0
    alpha: float = 0.5
    max_rows: int | None = None
    top_n: int = 1
    kl_steps: int = 300
    kl_lr: float = 0.1
    dustbin_correction: bool = True
    workers: int = 0
    eval: str | None = None
    device: str = "auto"
    data_dir: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3))
    storage_options: dict = field(default_factory=dict)  # fsspec options for an s3:// --cache

    def validate(self) -> None:
        from pipeline.experiments.specialists import SIMILARITIES

        problems = []
        if not self.cache:
            problems.append("--cache CACHE (the generalist's logits on the transfer set) must be given")
        if not self.out:
            problems.append("--out DIR must be given")
        if self.specialists is not None and self.classes_per_specialist is not None:
            problems.append("use --specialists K or --classes-per-specialist N, not both")
        if self.similarity not in SIMILARITIES:
            problems.append(f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        if self.init not in SPECIALIST_INITS:
            problems.append(f"init must be one of {', '.join(SPECIALIST_INITS)}, got {self.init!r}")
        if self.init_member < 0:
            problems.append(f"init_member must be >= 0, got {self.init_member}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.max_rows is not None and self.max_rows < 2:
            problems.append(f"max_rows must be >= 2, got {self.max_rows}")
        if self.top_n < 1:
            problems.append(f"top_n must be >= 1, got {self.top_n}")
        if self.kl_steps < 0:
            problems.append(f"kl_steps must be >= 0, got {self.kl_steps}")
        if not self.kl_lr > 0:
            problems.append(f"kl_lr must be > 0, got {self.kl_lr}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        _raise_all(problems, self.train)

    @property
    def cache_location(self) -> CacheLocation:
        """The generalist's cache, resolved once."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(self.cache, self.storage_options)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["storage_options"] = redact_secrets(self.storage_options)
        return d
