"""Training: the paper's losses, the one training loop, the cache loader, the trainers.

- ``losses``: the paper's losses behind one signature, and ensemble combination (the registries of
  both).
- ``loop``: the one training loop every mode uses (``fit``), its sources and ``TrainConfig``.
- ``loader``: streaming cached soft targets into training within a memory budget.
- ``teacher``: training a teacher ensemble (``train-teacher``).
- ``distill``: stage two, a student from a cache or a live teacher (``train-student``).
"""
