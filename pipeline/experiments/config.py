"""The config of ``sweep`` (:class:`SweepConfig`): a grid over one ``train-student`` config.

The axes (:data:`SWEEP_AXES`) set fields of :class:`pipeline.training.config.StudentConfig`;
every other ``train-student`` option reaches the sweep unchanged through its ``base``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from pipeline.checks import collect, in_range, temperature
from pipeline.distributed import refuse_torchrun
from pipeline.files import location_stem, slug
from pipeline.options import (
    field_problems,
    nested_config,
    option,
    parse_floats,
    parse_ints,
    show_list,
)
from pipeline.step_options import output_dir, raise_all
from pipeline.training.config import StudentConfig
from pipeline.training.train_config import TrainConfig

if TYPE_CHECKING:
    from pipeline.cache.location import CacheLocation


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
        raise_all(problems, probe.train)

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
