"""Options and rules that several steps' configs share, each declared once.

The configs live beside their steps (:mod:`pipeline.cache.config`,
:mod:`pipeline.training.config`, :mod:`pipeline.evaluation`, :mod:`pipeline.experiments.config`,
:mod:`pipeline.experiments.specialists.config`); what they have in common is here, below all of
them: the device, data directory, loader workers, trusted code and member options, the default
output directory, :func:`raise_all`, and :class:`Display` (how a command prints). Standard
library and :mod:`pipeline.options` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pipeline.errors import ConfigError
from pipeline.files import data_root
from pipeline.options import option, parse_indices

DEVICE_HELP = (
    "Where to run: auto (CUDA when present, else MPS, else CPU), cpu, cuda, cuda:N or mps."
)


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
    return str(data_root() / kind / name)


class Validates(Protocol):
    def validate(self) -> None: ...


def raise_all(problems: list[str], train: Validates | None = None) -> None:
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
class Display:
    """How a command prints: never part of what a run is, so never recorded with it."""

    quiet: bool = option(False, help="No progress bars or per-step lines.")
    json: bool = option(False, help="Print the result as JSON.")
    dry_run: bool = option(False, help="Print the grid and its estimated cost; train nothing.")
