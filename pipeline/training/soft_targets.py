"""Step 1 of a student's recipe: the soft-target source, a cache (checked against the dataset
it records) or a live teacher (:func:`setup_soft_targets`), and its provenance record
(:func:`soft_target_record`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.cache.transfer import load_transfer_set
from pipeline.checkpoints import fit_problems, load_models
from pipeline.data.stream import watch_content
from pipeline.datasets import (
    load_dataset,
)
from pipeline.distributed import (
    SINGLE,
    Ranks,
)
from pipeline.ensemble import combine_members
from pipeline.errors import CacheError, ConfigError
from pipeline.sequences.data import is_sequence
from pipeline.training.classification import CLASSIFICATION, SoftTargets
from pipeline.training.config import StudentConfig
from pipeline.training.loader import (
    cache_source,
    check_member_kinds,
    finished_shards,
)
from pipeline.training.sequence import (
    SequenceTask,
    check_same_tokenizer,
    is_token_cache,
    online_token_teacher,
    token_source,
)
from pipeline.training.sources import InMemorySource
from pipeline.training.targets import temperature_exact
from pipeline.training.views import live_transform, view_source, view_use


# ---------------------------------------------------------- the soft targets (step 1 of the recipe)
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


SEQUENCE = SequenceTask()
