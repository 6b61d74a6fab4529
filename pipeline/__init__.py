"""kd-pipeline's library: everything the CLI does, usable without the CLI.

Modules, by what they hold:

- ``errors``: the one exception type users see (``KDError``) and its kinds.
- ``files``: atomic writes (temp file, fsync, rename) and ``slug``, the spec -> directory-name rule.
- ``checks``: the field checks every config and loss shares (``positive``, ``in_range``, ...).
- ``datasets``: dataset specs (``NAME:SPLIT[:key=value...]``), the dataset registry,
  fingerprints, and ``resolve_eval_set`` (what ``--eval`` means, for every step).
- ``models``: model specs (``mlp:1200,1200``, ``cnn``, ``torchscript:PATH``, ``py:module:factory``), the registry.
- ``checkpoints``: saving/loading models with their metadata, safely (``weights_only=True``).
- ``losses``: the paper's losses behind one signature, and ensemble combination.
- ``metrics``: test errors, accuracy, NLL, ECE, agreement.
- ``training``: the one training loop every mode uses; ``training.distill.train_student``
  (stage two) as a recipe of steps: soft-target source, student, fit, finish.
- ``experiments``: sweeps; ``specialists/`` (clustering, one specialist, the combination, the
  steps); ``reproduce/`` (recipes, shared artefacts, sections measured as records, the report
  rendered from them).
- ``cache``: the Zarr logit cache format (imports without torch).
- ``devices``: picking a torch device without hard-coding one.
"""

__version__ = "0.1.0"
