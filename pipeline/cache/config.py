"""The configs of the cache steps: ``cache-logits`` (:class:`CacheConfig`) and the ``cache``
tools (:class:`CacheToolConfig`), with the options every cache user shares
(:func:`storage_options_option`) and the cache's dtypes (:data:`CACHE_DTYPES`).

Each option is declared once on its field (:func:`pipeline.options.option`); ``validate()``
reports every problem at once (``ConfigError``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pipeline.augment import augment_problems
from pipeline.cache.kinds import TAIL_TEMPERATURES
from pipeline.cache.location import parse_storage_options
from pipeline.checks import collect, temperature
from pipeline.distributed import refuse_torchrun
from pipeline.errors import ConfigError
from pipeline.files import slug
from pipeline.options import field_problems, option, parse_floats, show_list
from pipeline.registry import Registry
from pipeline.step_options import (
    data_dir_option,
    device_option,
    loader_workers_option,
    output_dir,
    trust_code_option,
)

if TYPE_CHECKING:
    from pipeline.cache.kinds import StorageSpec
    from pipeline.cache.location import CacheLocation

#: The dtypes cached logits are stored in (``--dtype``; None: the teachers' own precision).
CACHE_DTYPES: Registry[str] = Registry(
    "cache_dtypes", "dtype", lambda message: ConfigError([message])
)
CACHE_DTYPES.register("float16", "half the bytes; logits rounded to 11 significant bits", "float16")
CACHE_DTYPES.register("float32", "the logits as the teachers computed them", "float32")


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
        if self.dtype is not None:
            problems += collect(CACHE_DTYPES.problem("dtype", self.dtype))
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
