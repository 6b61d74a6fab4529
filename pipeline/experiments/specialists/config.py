"""The config of ``specialists`` (:class:`SpecialistsConfig`), its choices of similarity
(:data:`~pipeline.experiments.specialists.clustering.SIMILARITIES`) and of how specialists start
(:data:`SPECIALIST_INITS`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from pipeline.cache.config import storage_options_option
from pipeline.checks import collect, in_range, positive, temperature
from pipeline.errors import ConfigError
from pipeline.experiments.specialists.clustering import SIMILARITIES
from pipeline.files import location_stem
from pipeline.options import field_problems, option
from pipeline.redact import redact_options
from pipeline.registry import Registry
from pipeline.step_options import (
    data_dir_option,
    device_option,
    output_dir,
    raise_all,
    trust_code_option,
)
from pipeline.training.train_config import TrainConfig

if TYPE_CHECKING:
    from pipeline.cache.location import CacheLocation

#: ``--init``: where the specialists' weights start (``auto`` decides from ``--model``).
SPECIALIST_INITS: Registry[str] = Registry(
    "specialist_inits", "init", lambda message: ConfigError([message])
)
SPECIALIST_INITS.register(
    "auto", "generalist when the specialists' model is the generalist's, else scratch", "auto"
)
SPECIALIST_INITS.register("generalist", "the generalist member's weights", "generalist")
SPECIALIST_INITS.register("scratch", "fresh weights, seeded", "scratch")


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
    temperature: float = option(4.0, short="-T", help="Temperature of the collapsed soft targets.")
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
        problems += collect(
            SIMILARITIES.problem("similarity", self.similarity),
            SPECIALIST_INITS.problem("init", self.init),
        )
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
        raise_all(problems, self.train)

    @property
    def cache_location(self) -> CacheLocation:
        """The generalist's cache, resolved once."""
        from pipeline.cache.location import CacheLocation

        return CacheLocation.parse(self.cache, self.storage_options)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["storage_options"] = redact_options(self.storage_options)
        return d
