"""kd-pipeline's library: everything the CLI does, usable without the CLI.

Modules and sub-packages by layer, lowest first: a module imports only from its own layer and the
ones before it, nothing here imports ``stages``, and there is no import circle
(``tests/test_architecture.py`` holds the layers and checks them). Every set of names a user
picks from is a :class:`registry.Registry`; built-ins defined above a registry's own layer join
it through the one list in ``builtins``, plug-ins through entry points.

Foundation:

- ``errors``: the one exception type users see (``KDError``) and its kinds, and ``explain``,
  the one translation of storage and OS failures into them.
- ``registry``: ``Registry``, the one registration mechanism (names with one-line help, one
  wording for unknown names, plug-ins from ``kd_pipeline.<registry>`` entry points);
  ``builtins``: which modules register each registry's built-ins.
- ``files``: atomic writes (temp file, fsync, rename), ``slug`` (the spec -> name rule) and
  ``data_root`` (where outputs go by default).
- ``redact``: the one redaction rule: credentials are never recorded or printed.
- ``progress``: ``progress_bar``, drawn only on a terminal (never into log files, never empty),
  and ``progress_lines``, bounded progress lines when stdout is a log file; transformers' own
  bars are shown on a terminal only.
- ``checks``: the field checks every config and loss shares (``positive``, ``in_range``, ...).
- ``options``: how a config field declares its command-line option (``option(...)``), and the
  parsers for sizes, comma lists and ``CLASS=DELTA``; ``step_options``: the options several
  steps share (device, data directory, trusted code, ...), ``Display``, ``output_dir``;
  ``runfile``: run files (``--config FILE.toml``, ``--print-config``, ``config.toml``): the
  TOML writer and reader over the declared fields.
- ``specs``: what the spec registries share (``SourceData``, ``key=value`` option parsing).
- ``devices``: picking a torch device without hard-coding one (a registry).
- ``distributed``: torchrun ranks, DDP and the row spans each rank reads.
- ``cluster``: starting or joining a dask cluster for every step that maps tasks.
- ``allocator``: glibc malloc settings that keep freed memory for reuse.
- ``tv``: torchvision architectures (``tv:NAME``) with local weights only.

Data and models:

- ``data/``: ``lazy`` (inputs decoded when sliced), ``sources`` (image folders, Hugging Face
  datasets on disk, a user's torch Dataset), ``content`` (per-sample digests), ``idx`` (IDX
  files read into arrays), ``fingerprint`` (a dataset's content fingerprint).
- ``datasets``: dataset specs (``NAME:SPLIT[:key=value...]``), the dataset registry, and
  ``resolve_eval_set`` (what ``--eval`` means, for every step).
- ``augment``: augmentation specs (``shift:2``, ``crop:pad=4+flip``), the transform registry,
  and the seeded view parameters of view caches.
- ``models``: model specs (``mlp:1200,1200``, ``cnn``, ``torchscript:PATH``,
  ``py:module:factory``, ``tv:NAME``), the registry; ``hf_image``: Hugging Face image
  classifiers as teachers (``hf-image:DIR``, their image processor applied and recorded).
- ``sequences/``: ``tokenizers``, token-sequence datasets (``data``: ``text:``, ``tokens:``;
  ``hf_text``: the ``hf:`` source, text with ``text=COLUMN`` packed into sequences, else images)
  and sequence models (``models``: ``gpt:``, ``hf:DIR``; ``hf``: the Hugging Face model class,
  the trust and offline rules, ``save_pretrained`` export).
- ``checkpoints``: saving/loading models with their metadata, safely (``weights_only=True``).
- ``ensemble``: combining members' logits (``mean-probs``, ``mean-logits``: a registry).
- ``metrics``: test errors, accuracy, NLL, ECE, agreement.

Cache (stage one):

- ``cache/``: the Zarr logit cache (see its index): header, guard, location (with zipcheck,
  store_keys, lock), layout, kinds (storage kinds: a registry), rows, create, write, plan and
  writer (stage one), read (with read_checks, lookup, info), verify (with verify_chunks),
  copying (with copy_plan, bundle), listing, objects, reports, transfer, replay, and ``config``
  (the configs of ``cache-logits`` and the ``cache`` tools).
- ``data.stream``: a lazy dataset streamed next to a cache's rows.

Training (stage two):

- ``training/``: ``losses`` (the paper's losses: a registry), ``optim`` (optimisers, learning-rate
  schedules, precisions: registries), ``loop`` (the one training loop, ``TrainConfig``),
  ``loader`` (streaming cached soft targets), ``teacher`` (teacher ensembles), ``distill`` (stage
  two, a recipe: soft-target source, student, fit, finish, over a task: classification here,
  tokens in ``sequence``), ``sequence`` (what token students and teachers differ in),
  ``targets`` (sparse soft targets), ``views`` (view caches), ``config`` (the configs of
  ``train-teacher`` and ``train-student``), ``callbacks`` (``Callback``, ``FitState``),
  ``tracking`` (``metrics.jsonl`` and ``--log-to`` trackers: a registry), ``dataset``
  (``CacheDataset``, a cache as a torch dataset for other training loops) and ``functional``
  (``kd_loss``).
- ``api``: the library's face for other training loops: ``CacheDataset``, ``kd_loss``,
  ``SparseTargets``.
- ``evaluation``: test metrics of a checkpoint or an ensemble, and ``EvaluateConfig``.

Experiments:

- ``experiments/``: ``config`` (``SweepConfig``), ``sweep`` (grids as dask tasks),
  ``specialists/`` (clustering, one specialist, the combination, the steps, their config),
  ``reproduce/`` (recipes, shared artefacts, each experiment measured as a record in its own
  module, the report rendered from them), ``storage`` (the storage-kind study), ``sequence`` (the
  token study), ``bench`` (with ``bench_timing``, ``bench_figures``, ``bench_report``), ``demo``,
  ``plots``.
"""

__version__ = "0.1.0"
