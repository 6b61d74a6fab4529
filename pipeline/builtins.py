"""The one list of built-in registrations: which modules fill which registry.

A :class:`pipeline.registry.Registry` imports the modules listed under its name here on its
first lookup, after the module that defines it. This is how entries defined above the
registry's own layer (the token-sequence sources and models in ``pipeline.sequences``) join it
without the registry's module importing them: no import at the bottom of a module, no circle.
Third-party plug-ins join the same way through entry points (see :mod:`pipeline.registry`).

Plain data (module names as text), so the lowest layer may import it.
"""

from __future__ import annotations

#: Registry name -> the modules that register its built-in entries, in listing order.
BUILTINS: dict[str, tuple[str, ...]] = {
    "datasets": ("pipeline.datasets", "pipeline.sequences.data", "pipeline.sequences.hf_text"),
    "models": ("pipeline.models", "pipeline.sequences.models"),
    "augmentations": ("pipeline.augment",),
    "storage_kinds": ("pipeline.cache.builtin_kinds",),
    "losses": ("pipeline.training.losses",),
    "ensemble_methods": ("pipeline.ensemble",),
    "optimizers": ("pipeline.training.optim",),
    "lr_schedules": ("pipeline.training.optim",),
    "precisions": ("pipeline.training.optim",),
    "similarities": ("pipeline.experiments.specialists.clustering",),
}
