"""``kd-pipeline specialists cluster|train|evaluate|run``: specialist ensembles (section 5)."""

from __future__ import annotations

import click

from pipeline.experiments.specialists.config import SpecialistsConfig
from stages.boundary import KDGroup
from stages.params import configured


@click.group("specialists", cls=KDGroup)
def specialists_group() -> None:
    """Specialist ensembles (paper section 5) on a generalist's logit cache.

    \b
    cluster   group the classes the generalist confuses (k-means on its co-prediction matrix's
              columns)
    train     one specialist per group: its classes + a dustbin, half its classes and half the
              rest, soft targets from the cache collapsed onto its classes, initialised from the
              generalist
    evaluate  combine generalist and specialists on the test set (KL combination) and write
              report.md
    run       all three in order

    Every step takes the same options and writes into one --out directory (config.json,
    clusters.json/.md, specialists/<k>/specialist.pt, specialists.json, evaluation.json,
    report.md).
    """


SPECIALIST_STEPS = {
    "cluster": (("cluster",), "Cluster the classes by the generalist's confusions (clusters.md)."),
    "train": (
        ("train",),
        "Train one specialist per cluster of two or more classes (--workers N: dask).",
    ),
    "evaluate": (
        ("evaluate",),
        "Combine generalist and specialists on the test set; accuracy, per "
        "class, Table 4 (report.md).",
    ),
    "run": (("cluster", "train", "evaluate"), "cluster, train and evaluate in one go."),
}


def _specialists_command(name: str, steps: tuple[str, ...], doc: str) -> None:
    @specialists_group.command(name, help=doc)
    @configured(SpecialistsConfig)
    def command(cfg: SpecialistsConfig) -> None:
        from pipeline.experiments.specialists import run_steps

        run_steps(cfg, steps, log=click.echo)
        click.echo(f"wrote {cfg.out}")


for _name, (_steps, _doc) in SPECIALIST_STEPS.items():
    _specialists_command(_name, _steps, _doc)
