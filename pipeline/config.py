"""Config dataclasses for each step, and the one declaration of every command-line option.

Each field the CLI may set is declared once with :func:`pipeline.options.option` (default, help,
flag, choices from the library's registries, parser); ``stages/params.py`` generates the click
options from these declarations, so the CLI and the library cannot drift apart. Each
``validate()`` reports every problem at once (``ConfigError``). Configs are plain data: the CLI
fills them, the steps read them, ``resolve()`` fills derived defaults (output directories named
from the config), and ``to_dict()`` is what runs record as their resolved config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from pipeline.cache.kinds import TAIL_TEMPERATURES
from pipeline.cache.location import parse_storage_options
from pipeline.checks import collect, in_range, one_of, positive, temperature
from pipeline.distributed import refuse_torchrun
from pipeline.errors import ConfigError
from pipeline.experiments.specialists.clustering import SIMILARITIES
from pipeline.files import location_stem, slug
from pipeline.models import with_options
from pipeline.options import (
    field_problems,
    nested_config,
    option,
    parse_class_deltas,
    parse_floats,
    parse_indices,
    parse_ints,
    parse_size,
    show_list,
    show_size,
)
from pipeline.redact import redact_options
from pipeline.training.loop import TrainConfig

if TYPE_CHECKING:
    from pipeline.cache.kinds import StorageSpec
    from pipeline.cache.location import CacheLocation
from pipeline.training.losses import ENSEMBLE_METHODS, LOSSES

CACHE_DTYPES = ("float16", "float32")
MAX_MEMORY = 1 << 50  # 1 PiB: a --memory-budget above it is a typo, not a machine
SPECIALIST_INITS = ("auto", "generalist", "scratch")

DATASET_HELP = (
    "The transfer set: with --online-teacher, the data it runs on; with --cache, where this "
    "machine holds the data the cache was made on [default: the spec the cache records], "
    "accepted only when its fingerprint is the cache's."
)
DEVICE_HELP = (
    "Where to run: auto (CUDA when present, else MPS, else CPU), cpu, cuda, cuda:N or mps."
)


# Options shared by several configs: each is declared once here and used as a field default.
def device_option() -> str:
    return option("auto", help=DEVICE_HELP)


def loader_workers_option() -> int:
    return option(
        2,
        metavar="N",
        help="DataLoader worker processes decoding a lazy dataset's inputs (folder:, hf:, py:) "
        "off the main thread (0: decode in this process; in-memory datasets need none).",
    )


def data_dir_option() -> str | None:
    return option(
        None,
        metavar="DIR",
        help="Directory with dataset files for specs such as mnist:train (else $KD_DATA_DIR).",
    )


def storage_options_option() -> dict:
    return option(
        default_factory=dict,
        flag="--storage-option",
        multiple=True,
        parse=parse_storage_options,
        metavar="KEY=VALUE",
        help="Option for an s3:// cache's filesystem, e.g. endpoint_url=http://host:9000 or "
        "profile=team (credentials and endpoint otherwise come from the AWS_* "
        "environment variables); repeatable.",
    )


def trust_code_option() -> list[str]:
    return option(
        default_factory=list,
        multiple=True,
        metavar="MODULE",
        help="Allow a checkpoint or cache whose recorded model spec is py:MODULE:FACTORY (or "
        "torchscript:PATH) to import MODULE and its submodules (or load PATH), or an hf:DIR "
        "model whose config.json names custom code (auto_map) to run it (give DIR); repeatable. "
        "Without it such a file is refused: its author, not you, chose that code.",
    )


def members_option(help: str) -> list[int] | None:
    return option(None, parse=parse_indices, metavar="I,J,...", help=help)


def output_dir(kind: str, name: str) -> str:
    """The default output directory ``<data root>/<kind>/<name>``: ``data/<kind>/<name>`` under
    the current directory, or under ``$KD_OUTPUT_DIR`` when it is set."""
    from pipeline.datasets import data_root

    return str(data_root() / kind / name)


def _raise_all(problems: list[str], train: TrainConfig | None = None) -> None:
    """Raise one ``ConfigError`` with ``problems`` plus the training settings' own, if there are
    any.
    """
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
        if kind != "mlp" and (self.input_dropout is not None or self.max_norm is not None):
            problems.append(
                f"--input-dropout and --max-norm apply to mlp models, not {kind}; put the model's "
                "own options in its spec"
            )
        if kind not in ("mlp", "cnn") and self.dropout is not None:
            problems.append(f"--dropout applies to mlp and cnn models, not {kind}")
        if not self.out:
            problems.append("out (the ensemble directory) must be given")
        if self.trust_code and kind != "hf":
            problems.append(
                f"--trust-code allows an hf:DIR model's custom code; {kind} models have none "
                "to allow (a py: model you name is your own code)"
            )
        _raise_all(problems, self.train)

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
        kind = self.model.partition(":")[0]
        if kind == "mlp":
            own = {p.partition("=")[0] for p in self.model.split(":")[1:] if "=" in p}

            def pick(key: str, flag: float | None, paper: float) -> float | None:
                # The flag wins; else the spec's own value stays; else the paper's default.
                return flag if flag is not None else (None if key in own else paper)

            return with_options(
                self.model,
                input_dropout=pick("input_dropout", self.input_dropout, 0.2),
                dropout=pick("dropout", self.dropout, 0.5),
                max_norm=self.max_norm,
            )
        if kind == "cnn":
            return with_options(self.model, dropout=self.dropout)
        return self.model

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluateConfig:
    """``evaluate``: test metrics of a checkpoint or an ensemble on a labeled dataset."""

    model: str = option(
        "", required=True, exists=True, help="A checkpoint (.pt) or an ensemble directory."
    )
    dataset: str = option("fashion-mnist:test", help="Labeled dataset spec.")
    ensemble: str = option(
        "mean-probs",
        choices=ENSEMBLE_METHODS,
        help="How members are combined: arithmetic (mean-probs) or geometric (mean-logits) mean.",
    )
    batch_size: int = option(1024, help="Rows per forward pass.")
    device: str = device_option()
    data_dir: str | None = data_dir_option()
    trust_code: list[str] = trust_code_option()

    def validate(self) -> None:
        problems = field_problems(self)
        if not self.model:
            problems.append("model (a checkpoint or ensemble directory) must be given")
        problems += collect(one_of("ensemble", self.ensemble, ENSEMBLE_METHODS))
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if problems:
            raise ConfigError(problems)


# One rule for what is a credential: pipeline.redact's (it imports without torch).
redact_secrets = redact_options


def augment_problems(spec: str | None) -> list[str]:
    """What is wrong with an --augment spec (nothing when it parses or is not given)."""
    if spec is None:
        return []
    from pipeline.augment import parse_augment

    try:
        parse_augment(spec)
    except ConfigError as e:
        return list(e.problems)
    return []


def view_problems(views: int, augment: str | None, include_identity: bool) -> list[str]:
    """cache-logits' view options: counts, and what needs --augment."""
    problems = augment_problems(augment)
    if views < 1:
        problems.append(f"views must be >= 1, got {views}")
    if views > 1 and augment is None:
        problems.append(
            f"--views {views} needs --augment SPEC (e.g. shift:2): the views of a sample differ "
            "only by their augmentation"
        )
    if include_identity and augment is None:
        problems.append("--include-identity needs --augment SPEC (it makes view 0 unaugmented)")
    return problems


@dataclass
class CacheConfig:
    """``cache-logits``: run teachers once over a transfer set into a Zarr cache."""

    teachers: list[str] = option(
        default_factory=list,
        flag="--teacher",
        multiple=True,
        required=True,
        help="A teacher checkpoint or ensemble directory (each member becomes "
        "a cache member), or a torchvision model tv:NAME:weights=FILE; repeatable.",
    )
    dataset: str = option("fashion-mnist:train", help="Transfer set spec.")
    out: str = option(
        "",
        help="The cache: a directory (e.g. data/caches/fmnist.zarr) or "
        "s3://bucket/prefix/NAME.zarr [default: data/caches/<teacher>-<dataset>.zarr].",
    )
    dtype: str | None = option(
        None,
        choices=CACHE_DTYPES,
        help="Storage dtype of the logits "
        "[default: float16 for a new cache, the cache's own on resume].",
    )
    store: str = option(
        "auto",
        metavar="KIND",
        help="How each member's rows are stored: dense (raw logits), topk:K (the K largest "
        "logits + the exact tail at --tail-temperatures) or sampled:S (S classes drawn at "
        "--sample-temperature; unbiased); auto: dense up to 2048 classes, else topk:64 "
        "[a resumed cache keeps its own].",
    )
    tail_temperatures: list[float] = option(
        default_factory=lambda: list(TAIL_TEMPERATURES),
        parse=parse_floats,
        show=show_list,
        metavar="T,T,...",
        help="Temperatures at which topk/sampled rows record the exact log-sum-exp (and at "
        "which fidelity is measured); other temperatures are interpolated.",
    )
    sample_temperature: float = option(
        1.0,
        help="Temperature of the distribution sampled:S draws from (added to the recorded ones).",
    )
    seed: int = option(
        0,
        least=0,
        help="Seeds sampled:S draws (with the member and the shard) and the views' parameters "
        "(with the sample id and the view).",
    )
    views: int = option(
        1,
        most=1024,  # rows x views are computed and stored: 1e5 views of 600 rows took minutes
        help="Augmented views per sample (needs --augment): the teacher runs on each, and the "
        "cache stores each view's logits and its explicit parameters.",
    )
    augment: str | None = option(
        None,
        metavar="SPEC",
        help="The views' augmentation: transforms joined by +, e.g. shift:2, crop:pad=4+flip, "
        "rrc:scale=0.35,1+flip (registry: pipeline.augment).",
    )
    include_identity: bool = option(
        False, help="Make view 0 of every sample the unaugmented input (with --augment)."
    )
    batch_size: int = option(1024, help="Rows per teacher forward pass.")
    loader_workers: int = loader_workers_option()
    rows_per_shard: int | None = option(
        None,
        help="Rows per shard, the unit of writing, resuming "
        "and reading [default: 4096 for a new cache].",
    )
    device: str = device_option()
    workers: int = option(
        0,
        help="Start a dask LocalCluster of N worker processes and map shards "
        "over them (0: this process).",
    )
    scheduler: str | None = option(
        None, help="Address of an existing dask scheduler to use instead of --workers."
    )
    add_member: bool = option(False, help="Add the given teacher(s) to an existing complete cache.")
    data_dir: str | None = data_dir_option()
    command: str = ""  # the command line that made the cache (recorded in its header)
    storage_options: dict = storage_options_option()
    trust_code: list[str] = trust_code_option()

    def resolve(self) -> CacheConfig:
        """This config with ``out`` named from the first teacher and the dataset when not given
        (like every other command's default under ``data/``)."""
        if self.out or not self.teachers:
            return self
        teacher = str(self.teachers[0]).rstrip("/").rsplit("/", 1)[-1].removesuffix(".pt")
        name = f"{slug(teacher)}-{slug(self.dataset)}.zarr"
        return replace(self, out=output_dir("caches", name))

    def validate(self) -> None:
        problems = field_problems(self)
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
        if self.loader_workers < 0:
            problems.append(f"loader_workers must be >= 0, got {self.loader_workers}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.workers and self.scheduler:
            problems.append("use --workers N or --scheduler ADDRESS, not both")
        try:
            self.storage(1 << 20)
        except ValueError as e:
            problems.append(f"--store: {e}")
        if not self.tail_temperatures:
            problems.append("--tail-temperatures needs at least one temperature")
        problems += collect(*(temperature("tail_temperatures", t) for t in self.tail_temperatures))
        problems += collect(temperature("sample_temperature", self.sample_temperature))
        problems += view_problems(self.views, self.augment, self.include_identity)
        problems += refuse_torchrun("cache-logits")
        if problems:
            raise ConfigError(problems)

    def storage(self, num_classes: int) -> StorageSpec:
        """The members' storage for a teacher of ``num_classes`` (``auto`` resolved by it).

        Raises:
            ValueError: ``store`` is not a storage kind.
        """
        from pipeline.cache.kinds import StorageSpec

        return StorageSpec.parse(
            self.store, num_classes, self.tail_temperatures, self.sample_temperature
        )

    @property
    def location(self) -> CacheLocation:
        """The cache this run writes (``out`` with its storage options), resolved once."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(self.out, self.storage_options)


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
        _raise_all(problems, self.train)

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
        problems += collect(one_of("loss", self.loss, LOSSES))
        problems += collect(one_of("ensemble", self.ensemble, ENSEMBLE_METHODS))
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
        d["storage_options"] = redact_secrets(
            self.storage_options
        )  # runs are shared; credentials are not
        return d


def setting_name(student: str, temperature: float, alpha: float, seed: int) -> str:
    """A sweep setting's run-directory name, e.g. ``mlp-800-800-T4-a0.9-s0``."""
    return f"{slug(student)}-T{temperature:g}-a{alpha:g}-s{seed}"


#: What a sweep's axes set in each setting's :class:`StudentConfig` (dotted field paths).
SWEEP_AXES = {
    "students": "student",
    "temperatures": "temperature",
    "alphas": "alpha",
    "seeds": "train.seed",
}
#: Every StudentConfig field a sweep sets per setting: the axes' fields, and the run directory
#: (OUT/runs/<setting>), which the sweep replaces when it holds another run (it owns its runs).
SWEEP_OWNED = (*SWEEP_AXES.values(), "out", "overwrite")


def _field_at(config: object, path: str) -> object:
    """``config``'s value at a dotted field path, e.g. ``train.seed``."""
    for name in path.split("."):
        config = getattr(config, name)
    return config


@dataclass
class SweepConfig:
    """``sweep``: a grid over one :class:`StudentConfig`.

    ``base`` is the ``train-student`` config every setting starts from; each setting is ``base``
    with its student, temperature, alpha and seed from the axes (students x temperatures x alphas
    x seeds) and its run directory ``OUT/runs/<setting>`` (:meth:`setting_config`). No option of
    a single run is declared here again, so every ``train-student`` option reaches a sweep (the
    CLI offers all of them, less the fields in :data:`SWEEP_OWNED`), and a sweep row and a
    ``train-student`` run with the same options are the same run. The other fields are the
    sweep's own: where it runs its settings and where it writes.
    """

    base: StudentConfig = nested_config(StudentConfig, owned=SWEEP_OWNED)
    temperatures: list[float] = option(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 20.0],
        flag="--temperature",
        short="-T",
        parse=parse_floats,
        metavar="T,T,...",
        show=show_list,
        help="Comma-separated temperatures.",
    )
    alphas: list[float] = option(
        default_factory=lambda: [0.5, 0.9, 1.0],
        flag="--alpha",
        parse=parse_floats,
        show=show_list,
        metavar="A,A,...",
        help="Comma-separated soft-term weights (1 - alpha weighs the hard labels).",
    )
    students: list[str] = option(
        default_factory=lambda: [StudentConfig().student],
        flag="--student",
        multiple=True,
        show=show_list,
        help="Student model spec; repeat for several.",
    )
    seeds: list[int] = option(
        default_factory=lambda: [TrainConfig().seed],
        parse=parse_ints,
        show=show_list,
        metavar="N,N,...",
        least=0,
        help="Comma-separated seeds (one run per seed).",
    )
    workers: int | None = option(
        None,
        help="Worker processes of a local dask cluster [default: 2]; "
        "0 runs settings one by one here.",
    )
    scheduler: str | None = option(
        None, help="Address of an existing dask scheduler (instead of --workers)."
    )
    torch_threads: int = option(
        0,
        flag="--threads-per-worker",
        help="Torch threads per worker (0: the cores divided by the "
        "workers, so they do not oversubscribe).",
    )
    out: str = option(
        "",
        help="Sweep directory; each setting's run directory is OUT/runs/<setting> "
        "[default: data/sweeps/<cache>].",
    )

    def resolve(self) -> SweepConfig:
        """This config with ``out`` named from the cache when not given."""
        name = location_stem(self.base.cache) if self.base.cache else "online"
        return self if self.out else replace(self, out=output_dir("sweeps", name))

    def validate(self) -> None:
        """Refuse a bad grid, and everything a single run of it would refuse, all at once.

        The settings share every option but the axes, so what ``train-student`` would refuse
        is reported once for the grid (with each axis value checked on its own), not once per
        setting after some of them have trained.
        """
        problems = field_problems(self) + field_problems(self.base)
        for name in SWEEP_AXES:
            values = getattr(self, name)
            if not values:
                problems.append(f"{name} must have at least one value")
            elif len(set(values)) != len(values):
                problems.append(f"{name} has repeated values: {values}")
        problems += collect(*(temperature("temperature", t) for t in self.temperatures))
        problems += collect(*(in_range("alpha", a, 0, 1) for a in self.alphas))
        if self.workers is not None and self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.workers is not None and self.scheduler:
            problems.append("use --workers N or --scheduler ADDRESS, not both")
        problems += refuse_torchrun("sweep")
        if self.torch_threads < 0:
            problems.append(f"torch_threads must be >= 0, got {self.torch_threads}")
        if not self.out:
            problems.append("--out SWEEP_DIR must be given")
        problems += self.owned_problems()
        names: dict[str, tuple] = {}
        for st in self.students:
            for t in self.temperatures:
                for al in self.alphas:
                    name = setting_name(st, t, al, 0)
                    if name in names and names[name] != (st, t, al):
                        problems.append(
                            f"settings {names[name]} and {(st, t, al)} would share the run "
                            f"directory {name}; make the student specs or values distinguishable"
                        )
                    names[name] = (st, t, al)
        # Everything a single run would refuse, reported once for the whole grid.
        probe = self.setting_config(
            self.students[0] if self.students else self.base.student,
            1.0,
            0.5,
            self.seeds[0] if self.seeds else self.base.train.seed,
            out="probe",
        )
        problems += probe.shared_problems()
        _raise_all(problems, probe.train)

    def owned_problems(self) -> list[str]:
        """A value in ``base`` that each setting replaces would be silently ignored: refused."""
        default = StudentConfig()
        axis_of = {path: name for name, path in SWEEP_AXES.items()}
        problems = []
        for path in SWEEP_OWNED:
            value = _field_at(self.base, path)
            if value == _field_at(default, path):
                continue
            why = (
                f"each setting's comes from {axis_of[path]}"
                if path in axis_of
                else "each setting's run directory is OUT/runs/<setting>, replaced by the sweep "
                "when it holds another run"
            )
            problems.append(
                f"base.{path} = {value!r} would be ignored: {why}; leave it at its default"
            )
        return problems

    def setting_config(
        self, student: str, temperature: float, alpha: float, seed: int, out: str
    ) -> StudentConfig:
        """The one-run config of a setting: ``base`` with the setting's axis values and run
        directory, exactly what ``train-student`` would build from the same options."""
        return replace(
            self.base,
            student=student,
            temperature=temperature,
            alpha=alpha,
            out=out,
            # A sweep owns its run directories: it says which setting it replaces, and does.
            overwrite=True,
            train=replace(self.base.train, seed=seed),
        )

    @property
    def cache_location(self) -> CacheLocation | None:
        """The cache every setting reads, resolved once; None for an online teacher."""
        return self.base.cache_location

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base"] = self.base.to_dict()  # credentials redacted, as a run records them
        return d


@dataclass
class SpecialistsConfig:
    """``specialists``: cluster the classes, train one specialist per confusable cluster, combine at
    test time.
    """

    cache: str = option("", required=True, help="The generalist's logit cache on the transfer set.")
    out: str = option("", help="Output directory [default: data/specialists/<cache>].")
    generalist: list[str] | None = option(
        None,
        multiple=True,
        exists=True,
        help="The cache members' checkpoints or ensemble directory "
        "(run on the test set, and the specialists' initial "
        "weights) [default: the paths the cache records].",
    )
    specialists: int | None = option(
        None,
        help="Number of class clusters K [default: automatic, "
        "the largest K within 0.5 % of the best modularity].",
    )
    classes_per_specialist: int | None = option(
        None, help="Typical classes per specialist N (K = ceil(C / N)) instead of --specialists."
    )
    similarity: str = option(
        "log-moment",
        choices=SIMILARITIES,
        help="Matrix whose columns k-means clusters: log E[p pT] (covariance + "
        "mean outer product) or the raw covariance of the predicted "
        "probabilities.",
    )
    model: str | None = option(
        None,
        help="Specialist model spec [default: the generalist members' own, initialised from one].",
    )
    init: str = option(
        "auto",
        choices=SPECIALIST_INITS,
        help="Start from a generalist member's weights (auto: when the architecture is the same).",
    )
    init_member: int = option(0, help="Which cache member initialises the specialists.")
    temperature: float = option(
        4.0, short="-T", help="Temperature of the collapsed soft targets."
    )
    alpha: float = option(0.5, help="Weight of the soft term; 1 - alpha weighs the hard labels.")
    max_rows: int | None = option(
        None, help="Cap on each specialist's training rows (half its classes, half the rest)."
    )
    top_n: int = option(
        1, help="Activate specialists whose classes meet the generalist's top-n classes."
    )
    kl_steps: int = option(300, help="Gradient steps of the combination (Adam on q's logits).")
    kl_lr: float = option(0.1, most=100.0, help="Step size of the combination.")
    sensitivity: bool = option(
        True,
        flag="--no-sensitivity",
        negate=True,
        help="evaluate: skip the top-n x dustbin-correction sensitivity table (each of its rows "
        "combines the whole test set again: up to 5 more combinations).",
    )
    dustbin_correction: bool = option(
        True,
        flag="--no-dustbin-correction",
        negate=True,
        help="Do not raise the dustbin logit by log(oversampling) after training.",
    )
    workers: int = option(
        0,
        help="Train specialists as tasks on a dask LocalCluster of N "
        "processes (0 or 1: in-process).",
    )
    eval: str | None = option(
        None, help="Labeled test set [default: the transfer set's test split]."
    )
    dataset: str | None = option(
        None,
        help="Where this machine holds the data the cache was made on [default: the spec the "
        "cache records]; accepted only when its fingerprint is the cache's.",
    )
    device: str = device_option()
    data_dir: str | None = data_dir_option()
    # The CLI has always trained specialists for 10 epochs; the library now agrees with it.
    train: TrainConfig = field(default_factory=TrainConfig)
    storage_options: dict = storage_options_option()
    trust_code: list[str] = trust_code_option()

    def resolve(self) -> SpecialistsConfig:
        """This config with ``out`` named from the cache when not given."""
        return (
            self
            if self.out
            else replace(self, out=output_dir("specialists", location_stem(self.cache)))
        )

    def validate(self) -> None:
        problems = field_problems(self)
        if not self.cache:
            problems.append(
                "--cache CACHE (the generalist's logits on the transfer set) must be given"
            )
        if not self.out:
            problems.append("--out DIR must be given")
        if self.specialists is not None and self.classes_per_specialist is not None:
            problems.append("use --specialists K or --classes-per-specialist N, not both")
        if self.similarity not in SIMILARITIES:
            problems.append(
                f"similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}"
            )
        if self.init not in SPECIALIST_INITS:
            problems.append(f"init must be one of {', '.join(SPECIALIST_INITS)}, got {self.init!r}")
        if self.init_member < 0:
            problems.append(f"init_member must be >= 0, got {self.init_member}")
        problems += collect(temperature("temperature", self.temperature))
        problems += collect(in_range("alpha", self.alpha, 0, 1))
        if self.max_rows is not None and self.max_rows < 2:
            problems.append(f"max_rows must be >= 2, got {self.max_rows}")
        if self.top_n < 1:
            problems.append(f"top_n must be >= 1, got {self.top_n}")
        if self.kl_steps < 0:
            problems.append(f"kl_steps must be >= 0, got {self.kl_steps}")
        problems += collect(positive("kl_lr", self.kl_lr))
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


@dataclass
class Display:
    """How a command prints: never part of what a run is, so never recorded with it."""

    quiet: bool = option(False, help="No progress bars or per-step lines.")
    json: bool = option(False, help="Print the result as JSON.")
    dry_run: bool = option(False, help="Print the grid and its estimated cost; train nothing.")


@dataclass
class CacheToolConfig:
    """``cache info|verify|pack|copy|ls``: a cache (or a prefix of caches) and where it goes."""

    cache: str = option(
        "",
        argument=True,
        required=True,
        metavar="CACHE",
        help="A cache directory, NAME.zarr.zip or s3://bucket/prefix/NAME.zarr.",
    )
    out: str = option(
        "", argument=True, required=True, metavar="OUT", help="Where the copy or bundle goes."
    )
    prefix: str = option(
        "",
        argument=True,
        required=True,
        metavar="PREFIX",
        help="A directory or s3://bucket/prefix holding caches.",
    )
    dataset: str | None = option(
        None, help="A dataset spec whose fingerprint must match the cache's."
    )
    replay: int = option(
        0,
        metavar="N",
        help="verify: re-run --teacher on N stored rows (views rebuilt from their stored "
        "parameters) and check the logits match the cache to the storage dtype's rounding.",
    )
    teachers: list[str] = option(
        default_factory=list,
        flag="--teacher",
        multiple=True,
        exists=True,
        help="verify --replay: the cache's teacher checkpoint or ensemble directory; repeatable.",
    )
    storage_options: dict = storage_options_option()
    data_dir: str | None = data_dir_option()
    trust_code: list[str] = trust_code_option()

    def validate(self) -> None:
        """verify's --replay needs a teacher to re-run."""
        problems = field_problems(self)
        if self.replay < 0:
            problems.append(f"replay must be >= 0 rows, got {self.replay}")
        if self.replay and not self.teachers:
            problems.append(
                "--replay N needs --teacher PATH (the checkpoints the cache was made with)"
            )
        if problems:
            raise ConfigError(problems)

    def location(self, which: str = "cache") -> CacheLocation:
        """``cache``, ``out`` or ``prefix`` resolved once with the storage options."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(getattr(self, which), self.storage_options)
