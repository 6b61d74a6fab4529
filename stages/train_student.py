"""``kd-pipeline train-student``: stage two, a student distilled from the cache (or an online teacher)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import StudentConfig
from pipeline.distill import train_student


def run(cfg: StudentConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train one student and write its run directory (see ``pipeline.distill``)."""
    return train_student(cfg, log=log, progress=progress)
