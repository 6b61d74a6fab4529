"""Stage one's first step: what ``cache-logits`` will do, decided before anything is written.

:func:`plan_cache` inspects the location and the loaded inputs (:class:`CacheInputs`) and returns a
:class:`CachePlan`: create a new cache, resume a partial one, add members to a complete one, or
nothing (already complete), with the (shard, members) tasks still missing and the shard layout.
A cache that differs from the request is refused with every difference named. The plan is
executed by :func:`pipeline.cache.writer.execute_plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from pipeline.augment import ViewPlan
from pipeline.cache.config import CacheConfig
from pipeline.cache.header import CacheHeader, thaw
from pipeline.cache.info import describe_rows
from pipeline.cache.layout import shard_bounds
from pipeline.cache.location import CacheLocation
from pipeline.cache.lookup import read_header
from pipeline.cache.read import LogitCache
from pipeline.checkpoints import LoadedModel, fit_problems, load_checkpoint, member_paths
from pipeline.datasets import Dataset, load_dataset
from pipeline.errors import CacheError, CheckpointError, ConfigError
from pipeline.sequences.data import is_sequence, tokenizer_record

DEFAULT_ROWS_PER_SHARD = 4096

# A member record's extra key marking a teacher appended by --add-member (a member made with the
# cache has none): re-running the command that made the cache is then a no-op, not a refusal.
ADDED_WITH = "added_with"

Task = tuple[int, list[int]]  # (shard, member indices to compute for it)


class ShardLayout(NamedTuple):
    """How a cache's rows are split: ``rows_per_shard`` rows per shard, ``n`` rows in all."""

    rows_per_shard: int
    n: int

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n / self.rows_per_shard)

    def rows(self, tasks: list[Task]) -> int:
        """Rows the given tasks compute (each task is one shard)."""
        return sum(stop - start for start, stop in (shard_bounds(s, *self) for s, _ in tasks))


# ----------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class CacheInputs:
    """What ``cache-logits`` was given, loaded and checked: teachers (on CPU) and transfer set."""

    teachers: tuple[LoadedModel, ...]
    data: Dataset
    num_classes: int
    class_names: list[str]

    @classmethod
    def load(cls, cfg: CacheConfig) -> CacheInputs:
        """Load ``cfg``'s teachers and dataset and check that they fit each other.

        Raises:
            CheckpointError, DatasetError: with what is wrong.
        """
        paths = [p for t in cfg.teachers for p in member_paths(t)]
        loaded = tuple(load_checkpoint(p, "cpu", cfg.trust_code) for p in paths)
        data = load_dataset(cfg.dataset, cfg.data_dir)
        _check_members(list(loaded), data)
        if is_sequence(data):  # the tokenizer's vocabulary, whatever the heads' width
            return cls(loaded, data, data.num_classes, data.class_names)
        return cls(
            loaded,
            data,
            int(loaded[0].meta["num_classes"]),
            loaded[0].meta.get("class_names") or data.class_names,
        )

    @property
    def shas(self) -> list[str]:
        return [lm.sha256 for lm in self.teachers]

    def by_sha(self) -> dict[str, LoadedModel]:
        return {lm.sha256: lm for lm in self.teachers}


Action = Literal["create", "resume", "add-member", "already-complete"]
STATUS: dict[str, str] = {
    "create": "created",
    "resume": "resumed",
    "add-member": "member-added",
    "already-complete": "already-complete",
}


@dataclass(frozen=True)
class CachePlan:
    """What :func:`execute_plan` will do at a location, decided before anything is written.

    Attributes:
        action: ``create`` a new cache, ``resume`` a partial one, ``add-member`` (new teachers
            become members ``len(existing)..``), or ``already-complete`` (nothing to do: ``message``
            says why).
        layout: the shard layout (rows per shard, rows).
        num_classes: classes of every member.
        members: (index, checkpoint sha256) of every member once the plan is done.
        tasks: the (shard, member indices) still to compute, by shard.
        new_members: the teachers ``add-member`` appends, in order.
    """

    location: CacheLocation
    action: Action
    layout: ShardLayout
    num_classes: int
    members: tuple[tuple[int, str], ...]
    tasks: tuple[Task, ...] = ()
    new_members: tuple[LoadedModel, ...] = ()
    message: str = ""

    @property
    def status(self) -> str:
        """The result's status word: created, resumed, member-added or already-complete."""
        return STATUS[self.action]


def plan_cache(cfg: CacheConfig, location: CacheLocation, inputs: CacheInputs) -> CachePlan:
    """Inspect ``location`` and decide what ``cfg`` asks of it (read only; hold the lock).

    Raises:
        CacheError: the location holds a different cache, a partial one for ``--add-member``, or
            none for ``--add-member``; with what differs and what to do.
    """
    existing = read_header(location)
    if existing is None:
        if cfg.add_member:
            raise CacheError(
                f"{location}: --add-member needs an existing complete cache; drop "
                "--add-member to create one"
            )
        return _plan_create(cfg, location, inputs)
    if cfg.add_member:
        return _plan_add_members(location, existing, inputs)
    return _plan_resume(cfg, location, existing, inputs)


def _plan_create(cfg: CacheConfig, location: CacheLocation, inputs: CacheInputs) -> CachePlan:
    # A view or sequence cache's default shard holds about as many rows as a plain one's
    # (samples x views x positions).
    positions = inputs.data.positions if is_sequence(inputs.data) else 1
    default = max(1, DEFAULT_ROWS_PER_SHARD // (cfg.views * positions))
    layout = ShardLayout(cfg.rows_per_shard or default, len(inputs.data))
    indices = list(range(len(inputs.teachers)))
    return CachePlan(
        location,
        "create",
        layout,
        inputs.num_classes,
        tuple(enumerate(inputs.shas)),
        tuple((s, list(indices)) for s in range(layout.n_shards)),
    )


def _plan_resume(
    cfg: CacheConfig, location: CacheLocation, h: CacheHeader, inputs: CacheInputs
) -> CachePlan:
    # The command that made a complete cache, re-run after --add-member appended members: its
    # teachers are the cache's first members, which is the promised no-op, not a different cache.
    later = _added_later(h, inputs.shas) if h.complete else 0
    diffs = _describe_difference(h, inputs.data, inputs.shas, cfg, teachers=not later)
    if diffs:
        raise CacheError(
            f"{location} already holds a different cache:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --out, or --add-member to add a teacher to a "
            "complete cache"
        )
    layout = ShardLayout(h.rows_per_shard, h.n)
    members = tuple((m.index, m.checkpoint_sha256) for m in h.members)
    if h.complete:
        added = (
            f": the given {len(inputs.shas)} and {later} added with --add-member" if later else ""
        )
        return CachePlan(
            location,
            "already-complete",
            layout,
            h.num_classes,
            members,
            message=f"{location} is already complete ({rows_of(h)}, {len(h.members)} "
            f"members{added}); nothing to do",
        )
    cache = LogitCache(location, allow_partial=True)
    pending: dict[int, list[int]] = {}
    for m in cache.members:
        for s in np.flatnonzero(~cache.done_flags(m.index)):
            pending.setdefault(int(s), []).append(m.index)
    return CachePlan(
        location, "resume", layout, h.num_classes, members, tuple(sorted(pending.items()))
    )


def _plan_add_members(location: CacheLocation, h: CacheHeader, inputs: CacheInputs) -> CachePlan:
    if not h.complete:
        raise CacheError(
            f"{location} is partial; finish it first by re-running cache-logits "
            "without --add-member, giving every member's checkpoint in order ("
            + ", ".join(str(m.path) for m in h.members)
            + "), then add members"
        )
    data = inputs.data
    if h.dataset.fingerprint != data.fingerprint:
        raise CacheError(
            f"--add-member: the cache was made on {h.dataset.spec} (fingerprint "
            f"{h.dataset.fingerprint}), you gave {data.spec} ({data.fingerprint})"
        )
    if inputs.num_classes != h.num_classes:
        raise CacheError(
            f"--add-member: the new teacher predicts {inputs.num_classes} classes, "
            f"the cache has {h.num_classes}"
        )
    layout = ShardLayout(h.rows_per_shard, h.n)
    have = tuple((m.index, m.checkpoint_sha256) for m in h.members)
    new = tuple(lm for lm in inputs.teachers if lm.sha256 not in {sha for _, sha in have})
    if not new:
        return CachePlan(
            location,
            "already-complete",
            layout,
            h.num_classes,
            have,
            message=f"{location}: every given teacher is already a member; nothing to do",
        )
    added = tuple((len(have) + i, lm.sha256) for i, lm in enumerate(new))
    tasks = tuple((s, [i for i, _ in added]) for s in range(layout.n_shards))
    return CachePlan(location, "add-member", layout, h.num_classes, have + added, tasks, new)


def _added_later(h: CacheHeader, shas: list[str]) -> int:
    """How many members were appended with --add-member after ``shas`` (the cache's first
    members, in order) made it; 0 when ``shas`` is not such a prefix."""
    have = [m.checkpoint_sha256 for m in h.members]
    rest = h.members[len(shas) :]
    if not rest or have[: len(shas)] != shas or any(m.extra.get(ADDED_WITH) is None for m in rest):
        return 0
    return len(rest)


def _describe_difference(
    h: CacheHeader, data: Dataset, shas: list[str], cfg: CacheConfig, teachers: bool = True
) -> list[str]:
    """What differs between the cache and what was given (``teachers``: compare the members)."""
    diffs = []
    d = h.dataset
    tok_then = (d.extra.get("tokenizer") or {}).get("sha256")
    tok_now = (tokenizer_record(data).get("tokenizer") or {}).get("sha256")
    if tok_then and tok_now and tok_then != tok_now:
        diffs.append(
            f"tokenizer differs: the cache's is {tok_then[:19]}, the dataset's {tok_now[:19]}"
        )
    if d.fingerprint != data.fingerprint:
        diffs.append(
            f"dataset: the cache holds {d.spec} with fingerprint {d.fingerprint}, you "
            f"gave {data.spec} with fingerprint {data.fingerprint}"
        )
    have = [m.checkpoint_sha256 for m in h.members]
    if teachers and have != shas:
        diffs.append(
            "teachers: the cache's members are "
            + ", ".join(f"{m.path} ({m.checkpoint_sha256[:19]})" for m in h.members)
            + "; you gave "
            + ", ".join(s[:19] for s in shas)
        )
    if cfg.dtype and cfg.dtype != h.dtype:
        diffs.append(f"dtype: the cache stores {h.dtype}, you asked for {cfg.dtype}")
    if cfg.store != "auto":
        asked = cfg.storage(h.num_classes).identity()
        have = [h.storage(m.index) for m in h.members]
        if any(spec.identity() != asked for spec in have):
            diffs.append(
                "storage: the cache stores its members "
                + ", ".join(sorted({spec.text for spec in have}))
                + f" (temperatures {list(have[0].temperatures)}), you asked for --store "
                f"{cfg.store} (temperatures {asked['temperatures']})"
            )
    asked = None if cfg.augment is None else view_plan(cfg, data).record()
    if (cfg.views, asked) != (h.views, None if h.augment is None else thaw(h.augment)):
        diffs.append(
            f"views: the cache holds {h.views} view(s) per sample"
            + (f" of {h.augment['spec']}" if h.augment else "")
            + f", you asked for {cfg.views}"
            + (f" of {cfg.augment}" if cfg.augment else "")
            + (" with --include-identity" if cfg.include_identity else "")
        )
    # The header's seed is what a resumed write draws with (sampled rows, views, fidelity rows):
    # another --seed would be ignored while the command line recorded it; say so instead.
    if h.seed is not None and cfg.seed != h.seed:
        diffs.append(
            f"seed: the cache was made with --seed {h.seed}, you gave --seed {cfg.seed}; "
            f"re-run with --seed {h.seed} to resume or re-use it"
        )
    if cfg.rows_per_shard and cfg.rows_per_shard != h.rows_per_shard:
        diffs.append(
            f"rows per shard: the cache uses {h.rows_per_shard}, you asked for {cfg.rows_per_shard}"
        )
    return diffs


def view_plan(cfg: CacheConfig, data: Dataset, h: CacheHeader | None = None) -> ViewPlan:
    """The views to compute: the header's for an existing cache, else ``cfg``'s.

    Raises:
        ConfigError: the transfer set's samples are not images (C, H, W).
    """
    shape = data.sample_shape
    if len(shape) != 3:
        raise ConfigError(
            [
                f"--augment transforms images (C, H, W); the samples of {data.spec} have shape "
                f"{shape}: make views of image data only"
            ]
        )
    if h is not None and h.augment is not None:
        return ViewPlan.from_record(dict(h.augment), h.views, h.seed or 0, shape[1:])
    return ViewPlan.make(cfg.augment or "", cfg.views, cfg.seed, cfg.include_identity, shape[1:])


def _check_members(loaded: list[LoadedModel], data: Dataset) -> None:
    classes = {int(lm.meta["num_classes"]) for lm in loaded}
    if len(classes) > 1:
        raise CheckpointError(
            "teachers disagree on the number of classes: "
            + ", ".join(f"{lm.path}: {lm.meta['num_classes']}" for lm in loaded)
            + "; every member of one cache must predict the same classes"
        )
    problems = fit_problems(loaded, data)
    if problems:
        raise CheckpointError("; ".join(problems))
    shas = [lm.sha256 for lm in loaded]
    if len(set(shas)) != len(shas):
        raise CheckpointError(
            "the same checkpoint was given twice: " + ", ".join(str(lm.path) for lm in loaded)
        )


def rows_of(h: CacheHeader) -> str:
    """The header's rows as people read them: samples, and views or token positions per sample."""
    positions = 1 if h.rows is None else int(h.rows["positions"])
    return describe_rows(h.n, h.views, positions)
