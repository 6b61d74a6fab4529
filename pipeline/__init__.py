"""kd-pipeline's library: everything the CLI does, usable without the CLI.

Modules and sub-packages, lowest layer first (a module imports only from the ones above it, and
nothing here imports ``stages``):

- ``errors``: the one exception type users see (``KDError``) and its kinds, and ``explain``,
  the one translation of storage and OS failures into them.
- ``files``: atomic writes (temp file, fsync, rename) and ``slug``, the spec -> name rule.
- ``redact``: the one redaction rule: credentials are never recorded or printed.
- ``progress``: ``progress_bar``, drawn only on a terminal (never into log files, never empty).
- ``checks``: the field checks every config and loss shares (``positive``, ``in_range``, ...).
- ``options``: how a config field declares its command-line option (``option(...)``), and the
  parsers for sizes, comma lists and ``CLASS=DELTA``.
- ``devices``: picking a torch device without hard-coding one.
- ``datasets``: dataset specs (``NAME:SPLIT[:key=value...]``), the dataset registry,
  fingerprints, and ``resolve_eval_set`` (what ``--eval`` means, for every step).
- ``models``: model specs (``mlp:1200,1200``, ``cnn``, ``torchscript:PATH``,
  ``py:module:factory``), the registry.
- ``checkpoints``: saving/loading models with their metadata, safely (``weights_only=True``).
- ``metrics``: test errors, accuracy, NLL, ECE, agreement.
- ``cluster``: starting or joining a dask cluster for every step that maps tasks.
- ``cache/``: the Zarr logit cache: ``header`` (the typed header), ``guard`` (stored bytes
  checked against the header before zarr parses or decompresses them), ``location`` (where it
  lives; with ``zipcheck``, ``store_keys`` and ``lock``, the writer lock), ``layout``,
  ``create``, ``write`` (the format's layout, schema and shard writes; the
  format is specified in docs/cache-format.md), ``read`` (``LogitCache``, the reader; imports
  without torch), ``rows`` (the row index and views' parameters re-derived from the header:
  every reader's checks), ``plan`` and ``writer`` (stage one), ``verify``, ``copying``,
  ``listing`` (cache verify, copy/pack, ls),
  ``transfer`` (the transfer set behind a cache: recorded, or the user's copy by fingerprint).
- ``training/``: ``losses`` (the paper's losses and ensemble means: registries), ``loop`` (the
  one training loop, ``TrainConfig``), ``loader`` (streaming cached soft targets), ``teacher``
  (teacher ensembles), ``distill`` (stage two, a recipe: soft-target source, student, fit,
  finish, over a task: classification here, tokens in ``sequence``), ``sequence`` (what token
  students and teachers differ in), ``targets`` (sparse soft targets), ``views`` (view caches).
- ``config``: the configs of every step, each option declared once on its field.
- ``evaluation``: test metrics of a checkpoint or an ensemble.
- ``experiments/``: ``sweep`` (grids as dask tasks), ``specialists/`` (clustering, one
  specialist, the combination, the steps), ``reproduce/`` (recipes, shared artefacts, each
  experiment measured as a record in its own module, the report rendered from them), ``bench``
  (with ``bench_timing``, ``bench_figures``, ``bench_report``), ``demo``, ``plots``.
"""

__version__ = "0.1.0"
