"""Stage two: train a student from cached soft targets (or, as a baseline, from a live teacher).

:func:`train_student` is the one code path behind ``train-student`` (and sweeps, the demo and
the experiments). It is a recipe of four steps, each a function of its own: set up the soft-target
source (a cache, checked against the dataset it records, or a live teacher:
:func:`setup_soft_targets`), build and check the student (:func:`build_student`), fit it with
:func:`pipeline.training.fit` (:func:`fit_student`), and finish: correct biases, measure, and write
a run directory that describes itself (:func:`finish_run`)::

    RUN_DIR/
      student.pt      checkpoint (weights_only-safe) with the resolved config, the cache
                      fingerprint and metrics
      metrics.json    test errors, accuracy, NLL, ECE, per-class errors, teacher agreement,
                      bias fitting
      history.csv     per epoch: loss parts, train errors, test errors, seconds
      config.json     the resolved config
      config.toml     the same run as a run file: train-student --config config.toml replays it
      hf/             an hf:DIR student, also as transformers' save_pretrained (safetensors) with
                      the tokenizer: AutoModelForCausalLM.from_pretrained(RUN_DIR/hf)

Under ``torchrun`` (see :mod:`pipeline.distributed`) every rank runs this recipe on its share of
each epoch; the student is trained through DDP, and rank 0 alone logs, evaluates and writes the run
directory, which records the world size and the effective batch (``distributed`` in
``config.json`` and ``metrics.json``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.cache.transfer import load_transfer_set
from pipeline.checkpoints import fit_problems, load_models, save_checkpoint
from pipeline.data.lazy import is_lazy, workers_note
from pipeline.data.stream import watch_content
from pipeline.datasets import (
    Dataset,
    load_dataset,
    load_eval_dataset,
    parse_spec,
    resolve_eval_set,
)
from pipeline.devices import describe_device, resolve_device
from pipeline.distributed import (
    RECORD_ROWS_VAR,
    SINGLE,
    Ranks,
    RowRecorder,
    agree,
    broadcast,
    process_group,
)
from pipeline.ensemble import combine_members
from pipeline.errors import CacheError, ConfigError, KDError, ModelSpecError
from pipeline.files import atomic_write_json
from pipeline.metrics import classification_metrics, percent, predict_logits
from pipeline.models import KDModel, build_model
from pipeline.runfile import write_run_file
from pipeline.sequences.data import is_sequence
from pipeline.training.config import StudentConfig
from pipeline.training.loader import (
    StreamingCacheSource,
    cache_source,
    check_member_kinds,
    finished_shards,
    shard_targets,
)
from pipeline.training.loop import BestEpoch, InMemorySource, fit
from pipeline.training.losses import make_loss
from pipeline.training.sequence import (
    SequenceTask,
    check_same_tokenizer,
    is_token_cache,
    online_token_teacher,
    token_source,
)
from pipeline.training.targets import SparseTargets, temperature_exact
from pipeline.training.views import live_transform, shard_inputs, view_source, view_use

BIAS_GRID = np.round(np.arange(-5.0, 15.0001, 0.1), 4)


@dataclass
class SoftTargets:
    """Where a student's soft targets come from, set up and checked (step 1 of a student's recipe).

    Attributes:
        data: the transfer set (the cache's recorded dataset, or an online teacher's ``--dataset``).
        num_classes: the teacher's classes; class_names: their names.
        input_stats: the inputs' mean and std, for the student's normalisation (caches record them).
        source: the batches ``fit`` trains on (with cached soft targets, or inputs and labels only).
        teacher_fn: online teacher: inputs (B, *shape) -> combined logits (B, C); None for a cache.
        record: provenance for metrics.json and the checkpoint: ``{"cache": {...}}`` or
            ``{"online_teacher": {...}}``.
        cache, members: the cache and the member indices used (None for an online teacher).
        describe: how the soft targets arrive, for the log ("memory loader", "online teacher").
    """

    data: Dataset
    num_classes: int
    class_names: list[str]
    input_stats: tuple[float, float]
    source: InMemorySource | StreamingCacheSource
    teacher_fn: Callable[[torch.Tensor], torch.Tensor] | None
    record: dict
    cache: LogitCache | None = None
    members: list[int] | None = None
    describe: str = ""
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # live augmentation (--augment)
    # How students of these targets are built, trained and measured: image classification, or
    # token sequences (pipeline.training.sequence.SequenceTask). The recipe is the same.
    task: Any = None
    teacher: torch.nn.Module | None = None  # the teacher itself when at hand (test agreement)

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = CLASSIFICATION


def train_student(
    cfg: StudentConfig, log: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Train, correct, evaluate and save one student; returns what ``metrics.json`` holds.

    A recipe of named steps, each of which can be read (and tested) on its own:

    1. set up the soft-target source: a cache or a live teacher (:func:`setup_soft_targets`);
    2. build and check the student (:func:`build_student`), and resolve what it is measured on
       (:func:`~pipeline.datasets.resolve_eval_set`; :func:`check_bias_options`, so that a bad bias
       option fails before training, not after);
    3. fit it (:func:`fit_student`);
    4. finish: bias correction, evaluation, the run directory (:func:`finish_run`).

    Under torchrun each rank runs the steps on its share of the data; rank 0 alone logs and writes
    the run directory, and every rank returns rank 0's result.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    with process_group(device) as ranks:
        if not ranks.main:
            log, progress = (lambda line: None), False
        device = ranks.place(device)
        check_run_dir(cfg, log, ranks)
        t_start = time.perf_counter()
        targets = setup_soft_targets(cfg, device, log, ranks)
        task = targets.task
        refused = task.refused(cfg)
        if refused:  # an option this source cannot honour is refused, never ignored
            raise ConfigError(refused)
        # Ranks that opened another cache, read other data or got another command would train
        # apart (or hang in DDP): refuse before training.
        agree(
            ranks,
            {
                "config": run_config(cfg, ranks),
                "soft targets": targets.record,
                "rows": targets.source.num_rows,
                "steps per epoch": len(targets.source),
            },
        )
        student = task.build_student(cfg, targets, device)
        test = task.test_set(cfg, targets, log)
        val = validation_set(cfg, targets, test)
        watch_content(val, None, cfg.loader_workers)
        if any(d is not None and is_lazy(d.x) for d in (targets.data, test, val)):
            note = workers_note(cfg.loader_workers)  # once: three datasets share the setting
            if note:
                log(note)
        held, absent = check_bias_options(cfg, targets.data, targets.num_classes, log)
        best = task.best_epoch() if val is not None else None
        history = fit_student(cfg, student, targets, test, device, log, progress, ranks, val, best)
        result = None
        if ranks.main:
            result = finish_run(
                cfg,
                student,
                targets,
                test,
                held,
                absent,
                history,
                device,
                t_start,
                log,
                ranks,
                val,
                best,
            )
        return broadcast(ranks, result)


def run_config(cfg: StudentConfig, ranks: Ranks = SINGLE) -> dict:
    """What ``config.json`` records: the resolved config, and under torchrun the world size and
    the effective batch (``--batch-size`` is per process, as in DDP)."""
    out = cfg.to_dict()
    if ranks.distributed:
        out["distributed"] = {
            "world_size": ranks.world,
            "backend": ranks.backend,
            "batch_size_per_rank": cfg.train.batch_size,
            "effective_batch_size": cfg.train.batch_size * ranks.world,
        }
    return out


def check_run_dir(cfg: StudentConfig, log: Callable[[str], None], ranks: Ranks = SINGLE) -> None:
    """Refuse to replace a run of another config in ``cfg.out`` unless ``--overwrite``; say so
    when a run is replaced (it is, once training starts: :func:`fit_student`). A run on another
    number of processes is another config (its effective batch differs).

    Raises:
        ConfigError: ``cfg.out`` holds a run of another config and ``cfg.overwrite`` is off.
    """
    out = Path(cfg.out)
    recorded = _recorded_config(out)
    if recorded is None:
        return
    # Options added to StudentConfig since that run take their defaults: still the same config.
    defaults = json.loads(json.dumps(StudentConfig().to_dict()))
    now = _identity(json.loads(json.dumps(run_config(cfg, ranks))))
    diffs = _differences(_identity(with_defaults(defaults, recorded)), now)
    # Only where the cache was read from differs (a bucket, then its bundle): the same run when
    # it is the same cache.
    if (
        diffs
        and all(d.split(":")[0].split(".")[0] in ACCESS_FIELDS for d in diffs)
        and _recorded_cache_fingerprint(out) == _cache_fingerprint(cfg)
    ):
        diffs = []
    if diffs and not cfg.overwrite:
        raise ConfigError(
            [
                f"--out {out} already holds a run of another config ("
                + "; ".join(diffs[:4])
                + (", ..." if len(diffs) > 4 else "")
                + "); choose another --out, or pass --overwrite to replace it"
            ]
        )
    log(
        f"replacing the run in {out}"
        + (f" ({'; '.join(diffs[:4])})" if diffs else " (the same config, trained again)")
    )


# Where the soft targets are read from, not what they are: a run from a cache in a bucket and one
# from its bundle or local copy are the same run when the cache's fingerprint is the same.
ACCESS_FIELDS = ("cache", "storage_options")


def with_defaults(defaults: dict, recorded: dict) -> dict:
    """A recorded config completed with today's defaults, nested configs too: options added
    since the run was made (``train.grad_accum``, ...) take the value the run had in effect."""
    out = dict(defaults)
    for k, v in recorded.items():
        d = defaults.get(k)
        nested = isinstance(d, dict) and isinstance(v, dict) and k != "class_bias"
        out[k] = with_defaults(d, v) if nested else v
    return out


def same_run_config(recorded: dict, now: dict) -> bool:
    """Whether two recorded run configs (``config.json``) describe the same run, apart from where
    the cache was read from (the callers compare the caches' fingerprints)."""
    defaults = json.loads(json.dumps(StudentConfig().to_dict()))
    before = {
        k: v
        for k, v in _identity(with_defaults(defaults, recorded)).items()
        if k not in ACCESS_FIELDS
    }
    now = _identity(json.loads(json.dumps(now)))
    after = {k: v for k, v in now.items() if k not in ACCESS_FIELDS}
    return before == after


# Where a run's metrics are also logged, not what the run is: a run trained again with
# --log-to tensorboard (or a finished sweep re-run with it) is the same run.
TRACKING_FIELDS = ("log_to",)


def _identity(config: dict) -> dict:
    """A recorded run config without its :data:`TRACKING_FIELDS` (in ``train``)."""
    train = config.get("train")
    if not isinstance(train, dict):
        return config
    return {**config, "train": {k: v for k, v in train.items() if k not in TRACKING_FIELDS}}


def _cache_fingerprint(cfg: StudentConfig) -> str | None:
    """The fingerprint of the members this run reads from its cache (None for online teachers or
    a cache that cannot be read: then nothing counts as the same)."""
    if not cfg.cache:
        return None
    try:
        cache = LogitCache(cfg.cache_location, allow_partial=True)
    except KDError:
        return None
    members = cfg.members if cfg.members is not None else list(range(len(cache.members)))
    return cache_fingerprint(cache.header, members)


def _recorded_cache_fingerprint(out: Path) -> str:
    """The cache fingerprint a finished run records; "" (matching no fingerprint) when none."""
    try:
        return json.loads((out / "metrics.json").read_text())["cache"]["fingerprint"] or ""
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _recorded_config(out: Path) -> dict | None:
    """The config a run directory records (``config.json``, else ``metrics.json``'s), if any."""
    for name, key in (("config.json", None), ("metrics.json", "config")):
        try:
            data = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        data = data.get(key) if key else data
        if isinstance(data, dict):
            return data
    return None


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """``"temperature: 4.0 there, 20.0 now"`` for each field that differs (nested ones dotted)."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "class_bias":
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


# ------------------------------------------------------------------------------ 1. the soft targets
def setup_soft_targets(
    cfg: StudentConfig, device: torch.device, log: Callable[[str], None], ranks: Ranks = SINGLE
) -> SoftTargets:
    """The cache's soft targets (checked against the dataset it records), or a live teacher's;
    the source serves this rank's share of each epoch."""
    if cfg.cache:
        return _cache_targets(cfg, device, log, ranks)
    return _online_targets(cfg, device, ranks)


def _cache_targets(
    cfg: StudentConfig, device: torch.device, log: Callable[[str], None], ranks: Ranks
) -> SoftTargets:
    """Open the cache, check members, dataset and labels, and plan the loader (memory or stream)."""
    cache = LogitCache(cfg.cache_location, allow_partial=cfg.allow_partial)
    tokens = is_token_cache(cache)
    refused = (SEQUENCE if tokens else CLASSIFICATION).refused(cfg)
    if refused:  # before the transfer set and the rows are loaded
        raise ConfigError(refused)
    members = cfg.members if cfg.members is not None else list(range(len(cache.members)))
    bad = [m for m in members if m >= len(cache.members)]
    if bad:
        raise ConfigError(
            [f"--members {bad} out of range: the cache has members 0..{len(cache.members) - 1}"]
        )
    check_member_kinds(cache, members, cfg.ensemble, cfg.loss)
    # --dataset: this machine's copy of the cache's transfer set (checked by fingerprint).
    if cfg.dataset and tokens:  # say that the tokenizer differs, not only that
        want = dict(cache.dataset.extra.get("tokenizer") or {})  # the fingerprint does
        check_same_tokenizer(
            want, load_dataset(cfg.dataset, cfg.data_dir), "--dataset", f"the cache {cfg.cache} was"
        )
    data = load_transfer_set(cache, cfg.dataset, cfg.data_dir)
    watch_content(data, cache, cfg.loader_workers, cfg.train.batch_size)
    dspec = data.spec
    # A token cache's labels are the next tokens, kept with its transfer set.
    if cfg.alpha < 1 and not cache.labeled and not is_token_cache(cache):
        raise ConfigError(
            [
                f"--alpha {cfg.alpha} needs hard labels, but the cache's transfer set "
                f"{dspec} is unlabeled; use --alpha 1 (soft targets only)"
            ]
        )
    # The run's one snapshot of the finished shards: the loader serves these and the record counts
    # them, however many a writer finishes meanwhile. Each shard read is checked against the
    # dataset's labels (the cache's labels could have been rewritten to other valid classes).
    shards = finished_shards(cache, members)  # every source: image, view or token rows
    views = view_use(cfg, cache)
    common = {
        "members": members,
        "method": cfg.ensemble,
        "temperature": cfg.temperature,
        "batch_size": cfg.train.batch_size,
        "budget": cfg.memory_budget,
        "seed": cfg.train.seed,
        "shards": shards,
        "rank": ranks.share,
    }
    if tokens:  # rows per (sequence, position): served a sequence at a time
        if not is_sequence(data):
            raise CacheError(f"{cfg.cache}: its transfer set {dspec} is not a sequence dataset")
        source, plan = token_source(cache, data, **common)  # type: ignore[arg-type]
    else:
        # A view cache's rows are served by (sample, view): stored views replayed
        # (training/views.py).
        make_source = functools.partial(view_source, use=views) if views.replays else cache_source
        source, plan = make_source(cache, data.x, truth=data.y, **common)
    record = {
        "cache": {
            "location": cfg.cache,
            "fingerprint": cache_fingerprint(cache.header, members),
            "dataset": dspec,
            "recorded_dataset": cache.dataset.spec,
            "dataset_fingerprint": data.fingerprint,
            "members": members,
            "member_checkpoints": [cache.members[m].checkpoint_sha256 for m in members],
            "complete": cache.complete,
            "partial_used": not cache.complete,
            "shards_used": len(shards),
            "n_shards": cache.n_shards,
            "rows_used": source.num_rows,
            "loader": plan.to_dict(),
            "soft_targets": soft_target_record(cache, members, cfg),
        },
        "views": views.record(),
    }
    if tokens:
        record["cache"]["tokenizer"] = dict(cache.dataset.extra.get("tokenizer") or {})
        record["cache"]["positions"] = data.positions
    note = record["cache"]["soft_targets"].get("note")
    if note:
        log(f"note: {note}")
    if not cache.complete:
        log(
            f"warning: {cfg.cache} is partial; training on {len(shards)}/{cache.n_shards} shards "
            f"({source.num_rows} rows) because --allow-partial was given"
        )
    return SoftTargets(
        data=data,
        num_classes=cache.num_classes,
        class_names=list(cache.header.class_names),
        input_stats=tuple(cache.dataset.input_stats),
        source=source,
        teacher_fn=None,
        record=record,
        cache=cache,
        members=members,
        describe=f"{plan.mode} loader" + (f", views {views.mode}" if views.mode != "none" else ""),
        augment=live_transform(cfg.augment, cfg.train.seed) if cfg.augment and not tokens else None,
        task=SEQUENCE if tokens else CLASSIFICATION,
    )


def soft_target_record(cache: LogitCache, members: list[int], cfg: StudentConfig) -> dict:
    """How the cache's members become the run's soft targets: storage, exactness at T, and what
    the loss matches (recorded in metrics.json and the student's checkpoint)."""
    specs = [cache.storage(m) for m in members]
    sparse = [s for s in specs if s.sparse]
    out: dict = {"storage": [s.text for s in specs], "format_version": cache.header.version}
    if not sparse:
        out["exact"] = True
        return out
    exact = temperature_exact(sparse, cfg.temperature)
    out["recorded_temperatures"] = list(sparse[0].temperatures)
    out["exact"] = exact
    kind = sparse[0].impl
    if cfg.loss == "logit-mse":
        out["loss_matches"] = "the kept logits only (row mean of the kept ones removed)"
    else:
        out["loss_matches"] = kind.MATCHES
    notes = []
    if not exact and cfg.loss != "logit-mse":
        notes.append(
            f"T={cfg.temperature} is not a recorded temperature ({out['recorded_temperatures']}):"
            f" the {kind.INTERPOLATED} interpolated, not exact"
        )
    if cfg.loss == "logit-mse":
        notes.append("--loss logit-mse on a topk cache matches the kept logits only")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _online_targets(cfg: StudentConfig, device: torch.device, ranks: Ranks) -> SoftTargets:
    """Load the teachers and the transfer set; the soft targets are a forward pass on each batch."""
    teachers = load_models(cfg.online_teacher, device, cfg.trust_code)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.alpha < 1 and not data.labeled:
        raise ConfigError([f"--alpha {cfg.alpha} needs hard labels, but {data.spec} is unlabeled"])
    # What cache-logits checks for a cache: otherwise a mismatch surfaces mid-training as a bare
    # RuntimeError.
    mismatched = fit_problems(teachers, data)
    if mismatched:
        raise ConfigError(mismatched)
    models = [t.model for t in teachers]
    tokens = is_sequence(data)

    def teacher_fn(xb: torch.Tensor) -> torch.Tensor:
        return combine_members(torch.stack([m(xb) for m in models]), cfg.ensemble, cfg.temperature)

    if tokens:
        teacher_fn = online_token_teacher(models, data.num_classes, cfg.ensemble, cfg.temperature)

    record = {
        "online_teacher": {
            "paths": [str(t.path) for t in teachers],
            "checkpoints": [t.sha256 for t in teachers],
            "dataset": data.spec,
            "dataset_fingerprint": data.fingerprint,
        },
        "views": view_use(cfg, None).record(),
    }
    source = InMemorySource(
        data.x, data.y, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=ranks.share
    )
    return SoftTargets(
        data=data,
        num_classes=data.num_classes if tokens else int(teachers[0].meta["num_classes"]),
        class_names=data.class_names,
        input_stats=data.input_stats,
        source=source,
        teacher_fn=teacher_fn,
        record=record,
        describe="online teacher",
        augment=live_transform(cfg.augment, cfg.train.seed) if cfg.augment and not tokens else None,
        task=SEQUENCE if tokens else CLASSIFICATION,
        teacher=models[0] if tokens and len(models) == 1 else None,
    )


# ---------------------------------------------------------------------------------- 2. the student
def build_student(cfg: StudentConfig, targets: SoftTargets, device: torch.device) -> KDModel:
    """The student (seeded), checked to output one logit per teacher class.

    Raises:
        ConfigError: the student's network has another output width.
    """
    torch.manual_seed(cfg.train.seed)
    data, num_classes = targets.data, targets.num_classes
    shape = data.sample_shape
    # A user's spec can fail in any way (a factory with another signature, a file that is not
    # TorchScript, a network for other inputs): whatever it raises is reported as one error
    # about the spec, before training, not as a traceback from inside the loop.
    try:
        student = build_model(cfg.student, shape, num_classes, targets.input_stats)
    except KDError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: anything may come out of it
        raise ModelSpecError(
            f"student {cfg.student}: cannot be built for inputs of shape "
            f"{shape} and {num_classes} classes ({type(e).__name__}: {e})"
        ) from e
    student = student.to(device)
    # Probe the network itself on one batch of the dataset's shape: KDModel's forward adds an
    # (num_classes,) output bias, which broadcasts a 1-wide output to num_classes and turns any
    # other wrong width into a bare RuntimeError. Eval mode: the probe must not update batch-norm
    # statistics.
    student.eval()
    try:
        with torch.no_grad():
            xb = torch.as_tensor(data.x[:2]).to(device).float()
            logits = student.body((xb - student.input_mean) / student.input_std)
    except Exception as e:  # noqa: BLE001 - user code: anything may come out of it
        raise ModelSpecError(
            f"student {cfg.student} fails on a batch of inputs of shape "
            f"{tuple(xb.shape)} (the transfer set's samples are {shape}): "
            f"{type(e).__name__}: {e}; build the network for in_shape={shape}"
        ) from e
    student.train()
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(xb):
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelSpecError(
            f"student {cfg.student} returns {found} for a batch of shape "
            f"{tuple(xb.shape)}; expected logits of shape ({len(xb)}, "
            f"{num_classes})"
        )
    width = logits.shape[-1]
    if width != num_classes:
        raise ConfigError(
            [
                f"student {cfg.student} outputs {width} logits but the teacher has "
                f"{num_classes} classes; build the student for the cache's classes"
            ]
        )
    return student


def validation_set(
    cfg: StudentConfig, targets: SoftTargets, test: Dataset | None
) -> Dataset | None:
    """``--val``: the labeled set that chooses the student's epoch, checked to be held out.

    Choosing on rows the student trains on, or on the test set it is reported on, would make the
    reported error optimistic; both are refused, naming how many samples are shared.

    Raises:
        DatasetError: unlabeled, of another shape or class count, or not disjoint.
        ConfigError: it shares samples with the transfer set or the test set.
    """
    if not cfg.val:
        return None
    val = targets.task.val_set(cfg.val, targets, cfg.data_dir)
    problems = []
    for other, what, fix in (
        (
            targets.data,
            "transfer set",
            "carve both from one split with holdout=F, part=holdout "
            "for --val and the rest for the cache's dataset",
        ),
        (test, "test set", "never choose the epoch on the test set"),
    ):
        shared = shared_samples(val, other)
        if shared:
            problems.append(
                f"--val {val.spec} shares {shared} sample(s) with the {what} {other.spec}; {fix}"
            )
    if problems:
        raise ConfigError(problems)
    return val


def shared_samples(a: Dataset, b: Dataset | None) -> int:
    """How many samples two datasets share: ids of the same split of the same files (0 when they
    come from different splits or files, whose ids are not comparable)."""
    if b is None or a.source != b.source or _split(a.spec) != _split(b.spec):
        return 0
    return int(np.intersect1d(np.asarray(a.ids), np.asarray(b.ids)).size)


def _split(spec: str) -> tuple:
    """A spec without its modifiers: which split of which source (``fashion-mnist``, ``train``)."""
    source, args, _ = parse_spec(spec)
    return source.name, tuple(args)


# ------------------------------------------------------------------------------------------- 3. fit
def fit_student(
    cfg: StudentConfig,
    student: KDModel,
    targets: SoftTargets,
    test: Dataset | None,
    device: torch.device,
    log: Callable[[str], None],
    progress: bool,
    ranks: Ranks = SINGLE,
    val: Dataset | None = None,
    best: BestEpoch | None = None,
) -> list[dict]:
    """Record ``config.json`` in the run directory, then train with :func:`pipeline.training.fit`.

    With ``val`` (and ``best``), the validation errors and NLL are measured after every epoch and
    the student ends with the weights of its best epoch on them.

    Under torchrun only rank 0 touches the run directory and measures the test set after each
    epoch; with ``KD_RECORD_ROWS=DIR`` set, each rank saves the rows it trained on per epoch in
    DIR (a debugging hook: :class:`pipeline.distributed.RowRecorder`).

    Returns:
        The per-epoch history (also in ``history.csv``), with the test errors after each epoch.
    """
    task = targets.task
    loss = task.loss(cfg)
    out = Path(cfg.out)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        # A run being replaced loses its results now, not before: a failure before training keeps
        # it, and an interrupted retraining never leaves them beside the new config.json.
        for name in ("metrics.json", "student.pt"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "hf", ignore_errors=True)  # an hf:DIR student's export
        atomic_write_json(out / "config.json", run_config(cfg, ranks))
        # Its replayable twin (train-student --config OUT/config.toml); --overwrite is how this
        # invocation treated --out, not part of the run (config.json leaves it out too).
        write_run_file(out, replace(cfg, overwrite=False))
    source = targets.source
    if os.environ.get(RECORD_ROWS_VAR):
        source = RowRecorder(source, os.environ[RECORD_ROWS_VAR], ranks.rank)

    def evaluate(m: torch.nn.Module) -> dict:
        # Measured on rank 0 only; the test set for the history only: nothing is chosen on it.
        return task.epoch_metrics(m, val, test, device) if ranks.main else {}

    on = f"{describe_device(device)}, {targets.describe}"
    if ranks.distributed:
        on = (
            f"{ranks.world} processes ({ranks.backend}; batch {cfg.train.batch_size} each, "
            f"{cfg.train.batch_size * ranks.world} in all) on {on}"
        )
    log(
        f"training {cfg.student} on {targets.source.num_rows} {task.unit(targets.data)}: "
        f"loss={cfg.loss} T={cfg.temperature} alpha={cfg.alpha} ensemble={cfg.ensemble} on {on}"
    )
    return fit(
        task.trainable(student, targets.data),
        source,
        loss,
        cfg.train,
        device,
        teacher_fn=targets.teacher_fn,
        augment=targets.augment,
        evaluate=evaluate,
        history_csv=out / "history.csv" if ranks.main else None,
        log=log,
        desc="student",
        progress=progress,
        ranks=ranks,
        keep_best=best,
        config=run_config(cfg, ranks),
    )


# ---------------------------------------------------------------------------------------- 4. finish
def finish_run(
    cfg: StudentConfig,
    student: KDModel,
    targets: SoftTargets,
    test: Dataset | None,
    held: Dataset | None,
    absent: list[int],
    history: list[dict],
    device: torch.device,
    t_start: float,
    log: Callable[[str], None],
    ranks: Ranks = SINGLE,
    val: Dataset | None = None,
    best: BestEpoch | None = None,
) -> dict:
    """Correct the biases, measure, and complete the run directory: student.pt, then metrics.json.

    With ``val``, ``metrics.selection`` records the chosen epoch and its validation figures, and
    every measurement (test, bias fitting, agreement) is of that epoch's weights.

    ``metrics.json`` is written last and atomically: a run directory with one is a finished run
    (sweeps and experiments resume on it).

    Returns:
        What ``metrics.json`` holds: the soft targets' provenance, ``metrics`` and the ``config``.
    """
    out = Path(cfg.out)
    data, num_classes = targets.data, targets.num_classes
    task = targets.task
    metrics: dict = {"dataset": data.spec}
    if best is not None and val is not None:
        metrics["selection"] = {"on": val.spec, **best.record(len(history))}
        log(task.describe_selection(best, len(history), val))
    metrics.update(task.final_metrics(student, cfg, targets, test, held, absent, device, log))
    metrics["train_seconds"] = sum(r["seconds"] for r in history)
    metrics["wall_seconds"] = time.perf_counter() - t_start
    metrics["epochs"] = len(history)
    metrics["final_epoch"] = history[-1]
    if ranks.distributed:
        metrics["distributed"] = {
            **run_config(cfg, ranks)["distributed"],
            "steps_per_epoch": len(targets.source),
        }
    meta = {
        "model_spec": cfg.student,
        "in_shape": list(data.sample_shape),
        "num_classes": num_classes,
        **task.checkpoint_meta(targets),
        "config": run_config(cfg, ranks),
        **targets.record,
        "metrics": metrics.get("test"),
        "device": describe_device(device),
    }
    save_checkpoint(out / "student.pt", student, meta)
    task.save_outputs(student, targets, out)
    result = {**targets.record, "metrics": metrics, "config": run_config(cfg, ranks)}
    atomic_write_json(out / "metrics.json", result)
    if test is not None:
        log(task.describe_result(metrics["test"], test))
    return result


class ClassificationTask:
    """What stage two does for image (or any row) classifiers: the student maps an input to C
    logits, is measured by test errors, NLL and ECE (and agreement with the cached teacher), may
    have its output biases corrected, and ``--val`` chooses the epoch by validation errors (ties
    by NLL). :class:`pipeline.training.sequence.SequenceTask` is the same interface for tokens.
    """

    name = "classification"

    def refused(self, cfg: StudentConfig) -> list[str]:
        return []  # every StudentConfig option applies to classifiers

    def unit(self, data: Dataset) -> str:
        return "rows"

    def build_student(
        self, cfg: StudentConfig, targets: SoftTargets, device: torch.device
    ) -> KDModel:
        return build_student(cfg, targets, device)

    def trainable(self, student: torch.nn.Module, data: Dataset) -> torch.nn.Module:
        return student

    def loss(self, cfg: StudentConfig) -> Callable:
        return make_loss(cfg.loss, cfg.temperature, cfg.alpha)

    def test_set(
        self, cfg: StudentConfig, targets: SoftTargets, log: Callable[[str], None]
    ) -> Dataset | None:
        test = resolve_eval_set(cfg.eval, targets.data, cfg.data_dir, targets.num_classes, log=log)
        watch_content(test, None, cfg.loader_workers)
        return test

    def val_set(self, spec: str, targets: SoftTargets, data_dir: str | None) -> Dataset:
        return load_eval_dataset(spec, data_dir, targets.data, targets.num_classes)

    def best_epoch(self) -> BestEpoch:
        return BestEpoch()

    def epoch_metrics(
        self, m: torch.nn.Module, val: Dataset | None, test: Dataset | None, device: torch.device
    ) -> dict:
        row: dict = {}
        if val is not None:
            logits = predict_logits(m, val.x, device)
            labels = torch.as_tensor(val.y)
            wrong = int((logits.argmax(1) != labels).sum())
            nll = float(torch.nn.functional.cross_entropy(logits.float(), labels))
            row.update(val_errors=wrong, val_error_rate=wrong / len(val), val_nll=nll)
        if test is not None:
            logits = predict_logits(m, test.x, device)
            wrong = int((logits.argmax(1) != torch.as_tensor(test.y)).sum())
            row.update(test_errors=wrong, test_error_rate=wrong / len(test))
        return row

    def final_metrics(
        self,
        student: KDModel,
        cfg: StudentConfig,
        targets: SoftTargets,
        test: Dataset | None,
        held: Dataset | None,
        absent: list[int],
        device: torch.device,
        log: Callable[[str], None],
    ) -> dict:
        """Bias correction, then the test metrics and the agreement with the cached teacher."""
        out: dict = {}

        def test_metrics() -> dict:
            return classification_metrics(
                predict_logits(student, test.x, device),
                torch.as_tensor(test.y),
                targets.num_classes,
            )

        if test is not None and (cfg.class_bias or cfg.fit_bias_on):
            out["test_before_bias"] = test_metrics()
        bias_record = _apply_bias(student, cfg, held, absent, targets.num_classes, device, log)
        if test is not None:
            out["test"] = {"dataset": test.spec, **test_metrics()}
        if targets.cache is not None:
            out["teacher_agreement_transfer"] = _transfer_agreement(
                student, targets.cache, targets.data, targets.members, cfg, device
            )
        out["bias"] = bias_record
        return out

    def describe_selection(self, best: BestEpoch, epochs: int, val: Dataset) -> str:
        return (
            f"kept epoch {best.epoch} of {epochs}: {best.row['val_errors']} errors on "
            f"--val {val.spec} (NLL {best.row['val_nll']:.4f})"
        )

    def describe_result(self, t: dict, test: Dataset) -> str:
        return (
            f"student: {t['errors']} test errors ({percent(t['accuracy'])} accuracy, "
            f"NLL {t['nll']:.4f}, ECE {t['ece']:.4f}) on {test.spec}"
        )

    def save_outputs(self, student: torch.nn.Module, targets: SoftTargets, out: Path) -> None:
        """Nothing beside ``student.pt`` for classifiers."""

    def checkpoint_meta(self, targets: SoftTargets) -> dict:
        data = targets.data
        return {
            "class_names": targets.class_names,
            "dataset": {"spec": data.spec, "fingerprint": data.fingerprint},
        }


CLASSIFICATION = ClassificationTask()
SEQUENCE = SequenceTask()


# ----------------------------------------------------------------------------- bias correction
def absent_classes(dataset_meta: dict, num_classes: int, labels: np.ndarray | None) -> list[int]:
    """Classes missing from a transfer set: excluded / not kept by its modifiers, or with no labeled
    rows."""
    mods = dataset_meta.get("modifiers") or {}
    if "exclude" in mods:
        return sorted(mods["exclude"])
    if "keep" in mods:
        return sorted(set(range(num_classes)) - set(mods["keep"]))
    if labels is not None:
        return [int(c) for c in np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)]
    return []


def fit_class_bias(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[int]
) -> dict[int, float]:
    """Per-class logit offsets for ``classes`` that minimise errors on held-out labeled data.

    Coordinate search over a grid (-5 .. +15 step 0.1), two sweeps; ties go to the lower NLL. This
    is the paper's "increase the bias of the omitted class" chosen on held-out data rather than by
    hand.

    Args:
        logits: (N, C) student logits on the held-out set, before correction.
        labels: (N,) labels.
    """
    offsets = {c: 0.0 for c in classes}
    for _ in range(2):
        for c in classes:
            best = None
            for delta in BIAS_GRID:
                shifted = logits.clone()
                for k, v in offsets.items():
                    shifted[:, k] += float(delta) if k == c else v
                errors = int((shifted.argmax(1) != labels).sum())
                nll = float(torch.nn.functional.cross_entropy(shifted, labels))
                key = (errors, nll)
                if best is None or key < best[0]:
                    best = (key, float(delta))
            offsets[c] = best[1]
    return offsets


def check_bias_options(
    cfg: StudentConfig, data: Dataset, num_classes: int, log: Callable[[str], None] = print
) -> tuple[Dataset | None, list[int]]:
    """Validate the bias options before training (a bad one must not cost a whole run).

    Returns:
        The held-out set for ``--fit-bias-on`` (or None) and the classes absent from the transfer
        set.
    """
    bad = [
        f"--class-bias {c}={d}: class out of range 0..{num_classes - 1}"
        for c, d in cfg.class_bias.items()
        if not 0 <= c < num_classes
    ]
    if bad:
        raise ConfigError(bad)
    if not cfg.fit_bias_on:
        return None, []
    held = load_eval_dataset(cfg.fit_bias_on, cfg.data_dir, data, num_classes)
    absent = absent_classes(data.describe(), num_classes, data.y)
    if not absent:
        raise ConfigError(
            [
                f"--fit-bias-on: no class is absent from the transfer set {data.spec}; bias "
                "fitting is for transfer sets made with exclude= or keep="
            ]
        )
    # Rows the student trains on are not held out (its overconfidence there biases the fit).
    overlap = shared_samples(held, data)
    if overlap:
        log(
            f"warning: {overlap} of the {len(held)} rows of --fit-bias-on {held.spec} are in "
            f"the transfer set {data.spec}; set rows aside with holdout=F (e.g. transfer "
            "...:holdout=0.1:exclude=3, held-out ...:holdout=0.1:part=holdout)"
        )
    return held, absent


def _apply_bias(
    student: KDModel,
    cfg: StudentConfig,
    held: Dataset | None,
    absent: list[int],
    num_classes: int,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """Fit offsets for the absent classes on the held-out set (if any), then add the
    ``--class-bias`` offsets."""
    rec: dict = {"manual": {str(k): v for k, v in cfg.class_bias.items()}}
    if held is not None:
        logits = predict_logits(student, held.x, device)
        labels = torch.as_tensor(held.y)
        before = classification_metrics(logits, labels, num_classes)
        offsets = fit_class_bias(logits - student.output_bias.cpu(), labels, absent)
        for c, v in offsets.items():
            student.output_bias[c] = v
        after = classification_metrics(predict_logits(student, held.x, device), labels, num_classes)
        rec["fitted"] = {
            "on": held.spec,
            "classes": absent,
            "offsets": {str(k): v for k, v in offsets.items()},
            "errors_before": before["errors"],
            "errors_after": after["errors"],
            "class_errors_before": {str(c): before["per_class_errors"][c] for c in absent},
            "class_errors_after": {str(c): after["per_class_errors"][c] for c in absent},
        }
        log(
            f"fitted bias offsets {offsets} on {held.spec}: "
            f"errors {before['errors']} -> {after['errors']}"
        )
    for c, delta in cfg.class_bias.items():
        student.output_bias[c] += delta
    rec["output_bias"] = student.output_bias.cpu().tolist()
    return rec


@torch.inference_mode()
def _transfer_agreement(
    student: torch.nn.Module,
    cache: LogitCache,
    data: Dataset,
    members: list[int],
    cfg: StudentConfig,
    device: torch.device,
) -> float:
    """Fraction of transfer-set rows where the student's argmax equals the cached ensemble's (shard
    by shard)."""
    same = total = 0
    plan = view_use(cfg, cache).plan  # a view cache: compared on view 0, replayed
    for s in cache.done_shards(members):
        start, stop = cache.shard_bounds(int(s))
        teacher = shard_targets(cache, int(s), members, cfg.ensemble, cfg.temperature)
        top = teacher.top_class() if isinstance(teacher, SparseTargets) else teacher.argmax(1)
        x, rows = shard_inputs(cache, plan, int(s), data.x[start:stop])
        top = top[rows]
        pred = predict_logits(student, x, device)
        same += int((pred.argmax(1) == top).sum())
        total += stop - start
    return same / total if total else float("nan")
