"""The configs of the training steps: ``train-teacher`` (:class:`TeacherConfig`) and
``train-student`` (:class:`StudentConfig`); both carry the optimisation settings
(:class:`pipeline.training.train_config.TrainConfig`).

Each option is declared once on its field (:func:`pipeline.options.option`), with choices from
the registries (losses, ensemble methods); ``validate()`` reports every problem at once
(``ConfigError``), ``resolve()`` names the default output directory, and ``to_dict()`` is what a
run records as its resolved config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from pipeline.augment import augment_problems
from pipeline.cache.config import storage_options_option
from pipeline.checks import collect, in_range, positive, temperature
from pipeline.ensemble import ENSEMBLE_METHODS
from pipeline.files import location_stem, slug
from pipeline.models import MODELS, with_options
from pipeline.options import (
    field_problems,
    option,
    parse_class_deltas,
    parse_size,
    show_size,
)
from pipeline.redact import redact_options
from pipeline.step_options import (
    data_dir_option,
    device_option,
    loader_workers_option,
    members_option,
    output_dir,
    raise_all,
    trust_code_option,
)
from pipeline.training.losses import LOSSES
from pipeline.training.train_config import TrainConfig

if TYPE_CHECKING:
    from pipeline.cache.location import CacheLocation

#: The teacher options a model spec may take (see ``ModelBuilder.flags``).
TEACHER_FLAGS = ("input_dropout", "dropout", "max_norm")
MAX_MEMORY = 1 << 50  # 1 PiB: a --memory-budget above it is a typo, not a machine

DATASET_HELP = (
    "The transfer set: with --online-teacher, the data it runs on; with --cache, where this "
    "machine holds the data the cache was made on [default: the spec the cache records], "
    "accepted only when its fingerprint is the cache's."
)


@dataclass
class TeacherConfig:
    """``train-teacher``: an ensemble of ``members`` models, one seed each."""

    dataset: str = option("fashion-mnist:train", help="Labeled training set spec.")
    model: str = option(
        "mlp:1200,1200",
        help="Model spec: mlp:H1,H2,...[:key=value], cnn[:...], "
        "torchscript:PATH, py:module:factory; on token data gpt:... or hf:DIR (a transformers "
        "causal LM, or a config.json alone for random weights).",
    )
    input_dropout: float | None = option(None, help="Dropout on the inputs (mlp) [default: 0.2].")
    dropout: float | None = option(
        None, help="Dropout on hidden units (mlp [default: 0.5]; cnn [default: its spec's, 0.25])."
    )
    max_norm: float | None = option(
        None, help="Max-norm constraint on each hidden unit's incoming weights (mlp)."
    )
    jitter: int = option(
        2, help="Random shifts of up to N pixels per image each step (0 disables)."
    )
    members: int = option(3, help="Ensemble size (one seed per member).")
    eval: str | None = option(
        None,
        help="Labeled test set evaluated after each epoch [default: the "
        "training set's test split; '' skips].",
    )
    out: str = option("", help="Ensemble directory [default: data/teachers/<model>].")
    device: str = device_option()
    data_dir: str | None = data_dir_option()
    trust_code: list[str] = option(
        default_factory=list,
        multiple=True,
        metavar="DIR",
        help="Allow an hf:DIR model whose config.json names custom code (auto_map) to run it; "
        "without it such a model is refused (nothing is imported from DIR).",
    )
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolve(self) -> TeacherConfig:
        """This config with ``out`` named from the model when not given."""
        return self if self.out else replace(self, out=output_dir("teachers", slug(self.model)))

    def validate(self) -> None:
        problems = field_problems(self)
        problems += collect(positive("max_norm", self.max_norm, optional=True))
        if self.members < 1:
            problems.append(f"members must be >= 1, got {self.members}")
        if self.jitter < 0:
            problems.append(f"jitter must be >= 0 pixels, got {self.jitter}")
        for name in ("input_dropout", "dropout"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                problems.append(f"{name} must be in [0, 1), got {v}")
        kind = self.model.partition(":")[0]
        builder = MODELS.get(kind, None)
        takes = builder.flags if builder is not None else {}
        for flag in TEACHER_FLAGS:
            if getattr(self, flag) is not None and flag not in takes:
                models = " and ".join(n for n in MODELS if flag in MODELS[n].flags)
                problems.append(
                    f"--{flag.replace('_', '-')} applies to {models} models, not {kind}; put the "
                    "model's own options in its spec"
                )
        if not self.out:
            problems.append("out (the ensemble directory) must be given")
        if self.trust_code and kind != "hf":
            problems.append(
                f"--trust-code allows an hf:DIR model's custom code; {kind} models have none "
                "to allow (a py: model you name is your own code)"
            )
        raise_all(problems, self.train)

    def recipe(self) -> dict:
        """What defines the trained teacher: the config without where it is written, evaluated or
        run.

        Re-use compares this, so ``--out`` spelled relative vs absolute, ``--device`` or
        ``--data-dir`` do not make an existing teacher look different.
        """
        d = self.to_dict()
        for key in ("out", "device", "data_dir", "eval", "trust_code"):
            d.pop(key)
        return d

    def model_spec(self) -> str:
        """The model spec with the dropout / max-norm options resolved into it (the paper's defaults
        for mlp).
        """
        builder = MODELS.get(self.model.partition(":")[0], None)
        if builder is None or not builder.flags:
            return self.model
        own = {p.partition("=")[0] for p in self.model.split(":")[1:] if "=" in p}

        def pick(key: str, default: float | None) -> float | None:
            # The flag wins; else the spec's own value stays; else the model's default.
            flag = getattr(self, key)
            return flag if flag is not None else (None if key in own else default)

        return with_options(self.model, **{k: pick(k, d) for k, d in builder.flags.items()})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StudentConfig:
    """``train-student``: distil a student from a cache (or an online teacher)."""

    cache: str = option(
        "",
        help="The logit cache made by cache-logits (its dataset is used): a "
        "directory, NAME.zarr.zip or s3://bucket/prefix/NAME.zarr.",
    )
    student: str = option("mlp:800,800", help="Student model spec.")
    temperature: float = option(
        20.0,
        short="-T",
        help="Softmax temperature of the soft targets (and of the student in the soft term).",
    )
    alpha: float = option(
        0.9,
        help="Weight of the soft term; 1 - alpha weighs the hard-label "
        "cross-entropy (1 = soft only).",
    )
    loss: str = option(
        "kd",
        choices=LOSSES,
        help="kd: T^2 KL at temperature T; logit-mse: squared logit difference (the high-T limit).",
    )
    ensemble: str = option(
        "mean-probs",
        choices=ENSEMBLE_METHODS,
        help="Combine members by arithmetic mean of probabilities at T, or "
        "geometric mean (mean of logits).",
    )
    members: list[int] | None = members_option(
        "Comma-separated member indices of the cache to use [default: all]."
    )
    eval: str | None = option(
        None,
        help="Labeled test set [default: the transfer set's test split, e.g. fashion-mnist:test].",
    )
    val: str | None = option(
        None,
        metavar="SPEC",
        help="Labeled validation set measured after every epoch; the student keeps the weights of "
        "its epoch with the fewest validation errors (ties: lower NLL). Carve it from the "
        "training split, e.g. fashion-mnist:train:holdout=0.1:part=holdout, with the transfer set "
        "the rest (holdout=0.1); it must share no sample with the transfer set or the test set "
        "[default: none, the last epoch is kept].",
    )
    class_bias: dict[int, float] = option(
        default_factory=dict,
        multiple=True,
        parse=parse_class_deltas,
        metavar="CLASS=DELTA",
        help="CLASS=DELTA added to the student's logit bias after training.",
    )
    fit_bias_on: str | None = option(
        None,
        help="Labeled held-out set on which to fit bias offsets "
        "for classes absent from the transfer set.",
    )
    memory_budget: int = option(
        2 << 30,
        parse=parse_size,
        show=show_size,
        metavar="SIZE",
        most=MAX_MEMORY,
        help="Memory for targets+inputs: train from memory when they fit, else stream shards.",
    )
    loader_workers: int = loader_workers_option()
    allow_partial: bool = option(False, help="Train on the finished shards of a partial cache.")
    views_per_epoch: int = option(
        1,
        help="From a view cache: stored views per sample per epoch (each replayed exactly, with "
        "its own cached targets); 0: no views, the unaugmented input with view 0's targets "
        "(needs a cache made with --include-identity).",
    )
    augment: str | None = option(
        None,
        metavar="SPEC",
        help="Live augmentation: fresh random parameters every step (e.g. shift:2). From a cache "
        "the teacher never saw them (the inconsistent baseline); with --online-teacher the "
        "teacher sees the same view.",
    )
    online_teacher: list[str] | None = option(
        None,
        multiple=True,
        exists=True,
        help="Baseline: soft targets from a live teacher "
        "forward pass each batch instead of a cache.",
    )
    dataset: str | None = option(None, help=DATASET_HELP)
    out: str = option(
        "",
        help="Run directory [default: data/runs/<cache>-<student>-<loss>-"
        "<ensemble>-T<T>-a<alpha>[-m<members>]-s<seed>].",
    )
    overwrite: bool = option(
        False,
        help="Replace the run --out already holds: one of another config (refused without it) "
        "or a finished one of this config (reused without it).",
    )
    device: str = device_option()
    data_dir: str | None = data_dir_option()
    train: TrainConfig = field(default_factory=TrainConfig)
    storage_options: dict = storage_options_option()
    trust_code: list[str] = trust_code_option()

    def run_name(self) -> str:
        """The default run-directory name: what the run is, so two different runs never share it."""
        source = location_stem(self.cache) if self.cache else "online"
        members = f"-m{'.'.join(map(str, self.members))}" if self.members else ""
        views = f"-v{self.views_per_epoch}" if self.views_per_epoch != 1 else ""
        live = f"-aug-{slug(self.augment)}" if self.augment else ""
        return (
            f"{source}-{slug(self.student)}-{self.loss}-{self.ensemble}-T{self.temperature:g}"
            f"-a{self.alpha:g}{members}{views}{live}-s{self.train.seed}"
        )

    def resolve(self) -> StudentConfig:
        """This config with ``out`` named from the run when not given."""
        return self if self.out else replace(self, out=output_dir("runs", self.run_name()))

    def validate(self) -> None:
        problems = field_problems(self) + self.shared_problems()
        problems += collect(temperature("temperature", self.temperature))
        problems += collect(in_range("alpha", self.alpha, 0, 1))
        raise_all(problems, self.train)

    def shared_problems(self) -> list[str]:
        """Every problem but the setting's own temperature and alpha (what a sweep's settings
        share, so a sweep reports them once for the whole grid)."""
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
            problems.append(
                f"members must not repeat (a repeat would weigh a member twice), got {self.members}"
            )
        if self.online_teacher and (self.members is not None or self.allow_partial):
            problems.append(
                "--members and --allow-partial select cache members and shards; they do not apply "
                "to --online-teacher"
            )
        if self.online_teacher and self.views_per_epoch != 1:
            problems.append(
                f"--views-per-epoch {self.views_per_epoch} picks stored views of a view cache; an "
                "online teacher sees the live inputs (use --augment SPEC for fresh views)"
            )
        if self.online_teacher and self.memory_budget != 2 << 30:
            problems.append(
                "--memory-budget chooses how a cache's rows are served (in memory or streamed); "
                "an online teacher computes its soft targets per batch and reads no cache"
            )
        problems += collect(LOSSES.problem("loss", self.loss))
        problems += collect(ENSEMBLE_METHODS.problem("ensemble", self.ensemble))
        problems += augment_problems(self.augment)
        if self.views_per_epoch < 0:
            problems.append(f"views_per_epoch must be >= 0, got {self.views_per_epoch}")
        if self.memory_budget < 1 << 20:
            problems.append(f"memory_budget must be at least 1 MiB, got {self.memory_budget} bytes")
        if self.loader_workers < 0:
            problems.append(f"loader_workers must be >= 0, got {self.loader_workers}")
        if not self.out:
            problems.append("out (the run directory) must be given")
        return problems

    @property
    def cache_location(self) -> CacheLocation | None:
        """The cache this run reads, resolved once; None for an online teacher."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(self.cache, self.storage_options) if self.cache else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("overwrite")  # how this invocation treats --out, not what the run is
        d["class_bias"] = {str(k): v for k, v in self.class_bias.items()}
        d["storage_options"] = redact_options(
            self.storage_options
        )  # runs are shared; credentials are not
        return d
