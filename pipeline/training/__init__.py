"""Training: the paper's losses, the one training loop, the cache loader, the trainers.

- ``losses``: the paper's losses behind one signature, and ensemble combination (the registries of
  both).
- ``loop``: the one training loop every mode uses (``fit``).
- ``train_config``: ``TrainConfig``, the loop's options.
- ``sources``: what the loop trains on (``InMemorySource``, the ``BatchSource`` protocol).
- ``fit_callbacks``: the callbacks every fit uses (measuring, model selection, history, epoch line).
- ``loader``: streaming cached soft targets into training within a memory budget.
- ``teacher``: training a teacher ensemble (``train-teacher``).
- ``distill``: stage two, a student from a cache or a live teacher (``train-student``): the
  recipe.
- ``soft_targets``: the recipe's soft-target source, a cache or a live teacher.
- ``classification``: the recipe for classifiers (the soft targets, the student, the task).
- ``bias``: output-bias correction for transfer sets that omit classes.
- ``run_dir``: a student's run directory as a record (its config; whether a run is the same).
"""
