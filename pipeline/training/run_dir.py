"""A student's run directory as a record: the config it holds (``config.json``), and whether
a new run is the same run (:func:`check_run_dir` refuses to replace another config's run unless
``--overwrite``; :func:`same_run_config` lets sweeps resume finished runs).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pipeline.cache.lookup import cache_fingerprint
from pipeline.cache.read import LogitCache
from pipeline.distributed import (
    SINGLE,
    Ranks,
)
from pipeline.errors import ConfigError, KDError
from pipeline.training.config import StudentConfig


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
    when a run is replaced (it is, once training starts:
    :func:`~pipeline.training.distill.fit_student`). A run on another number of processes is
    another config (its effective batch differs).

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
