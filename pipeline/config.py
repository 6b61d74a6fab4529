"""Every step's config, re-exported from where it lives (for existing imports only).

The configs live beside their steps: :mod:`pipeline.cache.config` (``cache-logits``, the cache
tools), :mod:`pipeline.training.config` (``train-teacher``, ``train-student``),
:mod:`pipeline.evaluation` (``evaluate``), :mod:`pipeline.experiments.config` (``sweep``),
:mod:`pipeline.experiments.specialists.config` (``specialists``), with the options they share in
:mod:`pipeline.step_options`. This module is the top of the library's layers: nothing in
``pipeline`` imports it; new code imports from the modules above.
"""

from __future__ import annotations

from pipeline.augment import augment_problems
from pipeline.cache.config import (
    CACHE_DTYPES,
    CacheConfig,
    CacheToolConfig,
    storage_options_option,
    view_problems,
)
from pipeline.evaluation import EvaluateConfig
from pipeline.experiments.config import SWEEP_AXES, SWEEP_OWNED, SweepConfig, setting_name
from pipeline.experiments.specialists.config import SPECIALIST_INITS, SpecialistsConfig
from pipeline.redact import redact_options as redact_secrets
from pipeline.step_options import (
    DEVICE_HELP,
    Display,
    data_dir_option,
    device_option,
    loader_workers_option,
    members_option,
    output_dir,
    trust_code_option,
)
from pipeline.training.config import DATASET_HELP, MAX_MEMORY, StudentConfig, TeacherConfig
from pipeline.training.loop import TrainConfig

__all__ = [
    "CACHE_DTYPES",
    "DATASET_HELP",
    "DEVICE_HELP",
    "MAX_MEMORY",
    "SPECIALIST_INITS",
    "SWEEP_AXES",
    "SWEEP_OWNED",
    "CacheConfig",
    "CacheToolConfig",
    "Display",
    "EvaluateConfig",
    "SpecialistsConfig",
    "StudentConfig",
    "SweepConfig",
    "TeacherConfig",
    "TrainConfig",
    "augment_problems",
    "data_dir_option",
    "device_option",
    "loader_workers_option",
    "members_option",
    "output_dir",
    "redact_secrets",
    "setting_name",
    "storage_options_option",
    "trust_code_option",
    "view_problems",
]
