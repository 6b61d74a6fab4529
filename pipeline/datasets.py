"""Datasets: specs, a registry of sources, stable sample ids and content fingerprints.

A dataset spec is ``NAME:ARGS...:SPLIT[:key=value...]``:

- ``fashion-mnist:train`` / ``fashion-mnist:test``: the shipped Fashion-MNIST
  (``data/fashion-mnist``).
- ``mnist:train|test``: the original MNIST IDX files from ``--data-dir`` or ``$KD_DATA_DIR`` (or
  their ``mnist/``).
- ``idx:DIR:train|test``: any directory holding the four MNIST-style file names, gzipped or not.
- ``npz:FILE:SPLIT``: arrays ``x_<split>`` and optional ``y_<split>`` (no labels = an unlabeled
  transfer set); optional ``class_names`` (strings) or ``num_classes`` (scalar).
- Lazy sources, which never hold the split in memory (:mod:`pipeline.data.sources`):
  ``folder:DIR:SPLIT[:size=S:crop=C:mode=rgb|grey]`` (image folders), ``hf:DIR:SPLIT[:x=COL:y=COL]``
  (a Hugging Face dataset on disk), ``py:package.module:factory`` (a user's torch Dataset). Their
  ``x`` is a :class:`pipeline.data.lazy.LazyInputs`, decoded when sliced; their fingerprint covers
  structure (names, labels, ids, preprocessing) and their content is checked by per-sample digests
  that stage one stores in the cache.

Modifiers, usable on any spec and recorded in metadata (applied in this order):

- ``holdout=0.1`` sets aside a seeded share of the whole split (drawn before anything else, with
  ``seed=N``): ``part=rest`` (the default) keeps the other rows, ``part=holdout`` only the set-aside
  ones, so the two are disjoint whatever else follows (e.g. a transfer set without class 3 and a
  held-out set to fit its bias on).
- ``exclude=3,5`` drops those classes; ``keep=0,1`` keeps only those (the paper's omitted-class
  experiments).
- ``fraction=0.03`` or ``count=1000`` keeps a random subset, drawn with ``seed=N`` (default 0), in
  original order.

Every sample keeps its index in the unmodified split as its stable id, so ids survive filtering and
subsetting. The fingerprint is a sha256 over the inputs and labels in order (with their shapes and
dtypes), computed in chunks so that it never copies the whole array.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.data import sources as lazy_sources
from pipeline.data.fingerprint import FINGERPRINT_CHUNK, fingerprint_arrays
from pipeline.data.idx import IDX_FILES, find_idx_file, read_idx_split, shipped_fashion_mnist_dir
from pipeline.data.lazy import is_lazy
from pipeline.errors import ConfigError, DatasetError
from pipeline.registry import Registry
from pipeline.specs import SourceData

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]
MODIFIER_KEYS = ("holdout", "part", "exclude", "keep", "fraction", "count", "seed")
PARTS = ("rest", "holdout")


@dataclass
class Dataset:
    """An in-memory dataset with identity.

    Attributes:
        spec: canonical spec string (modifiers included), enough to load it again.
        x: raw inputs, shape (N, *sample_shape); uint8 pixels or float32. Models normalise
            themselves.
        y: labels, shape (N,) int64, or None for an unlabeled transfer set.
        ids: stable sample ids, shape (N,) int64: the index of each sample in the unmodified split.
        num_classes: number of classes of the task (of the unmodified split: filtering keeps it).
        class_names: one name per class.
        source: where the data came from (files), for metadata.
        modifiers: the applied modifiers, for metadata.
    """

    spec: str
    x: np.ndarray
    y: np.ndarray | None
    ids: np.ndarray
    num_classes: int
    class_names: list[str]
    source: dict = field(default_factory=dict)
    modifiers: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def labeled(self) -> bool:
        return self.y is not None

    @cached_property
    def fingerprint(self) -> str:
        if is_lazy(self.x):  # structure only: the content is checked by digests as rows are read
            return self.x.fingerprint(self.y, self.ids)
        return fingerprint_arrays(self.x, self.y)

    @cached_property
    def input_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of all input values, for the models' input normalisation."""
        if is_lazy(self.x):  # a seeded sample: a full pass would decode the whole split
            return self.x.input_stats()
        total, total_sq, count = 0.0, 0.0, 0
        flat = self.x.reshape(len(self), -1)
        if flat.dtype == np.uint8 and flat.size:
            # Images: exact integer sums in int32 blocks (squares <= 255^2 fit), about twice as fast
            # as float64 blocks and the same result (those sums were exact integers in float64 too).
            step = max(1, FINGERPRINT_CHUNK // max(1, flat.shape[1]))
            isum = isq = 0
            for start in range(0, len(self), step):
                block = flat[start : start + step].astype(np.int32)
                isum += int(block.sum(dtype=np.int64))
                isq += int((block * block).sum(dtype=np.int64))
            total, total_sq, count = float(isum), float(isq), int(flat.size)
            mean = total / count
            std = max((total_sq / count - mean * mean), 0.0) ** 0.5
            return mean, (std if std > 0 else 1.0)
        step = max(1, FINGERPRINT_CHUNK // max(1, flat.shape[1]))
        for start in range(0, len(self), step):
            block = flat[start : start + step].astype(np.float64)
            total += float(block.sum())
            total_sq += float((block * block).sum())
            count += block.size
        if count == 0:
            return 0.0, 1.0
        mean = total / count
        std = max((total_sq / count - mean * mean), 0.0) ** 0.5
        return mean, (std if std > 0 else 1.0)

    def describe(self) -> dict:
        """JSON metadata: what this dataset is, for caches and checkpoints."""
        lazy = self.x.describe() if is_lazy(self.x) else {}
        return {
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "n": len(self),
            "sample_shape": list(self.sample_shape),
            "input_dtype": str(self.x.dtype),
            "labeled": self.labeled,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_stats": list(self.input_stats),
            "modifiers": self.modifiers,
            "source": self.source,
            **lazy,
        }


# ----------------------------------------------------------------------------------------- registry
@dataclass
class DatasetSource:
    """A registered dataset source: how many positional args its spec takes, and its loader.

    ``options`` are the source's own ``key=value`` modifiers (parsed by their callables, passed to
    ``load`` as keyword arguments, kept in the canonical spec and in its test split's spec).
    """

    name: str
    args: tuple[str, ...]
    load: Callable[..., SourceData]
    help: str
    options: dict[str, Callable[[str], object]] = field(default_factory=dict)


#: Dataset source names -> their :class:`DatasetSource`. Token-sequence sources (``text:``,
#: ``tokens:``) join from ``pipeline.sequences.data`` (listed in
#: :data:`pipeline.builtins.BUILTINS`); plug-ins from the entry point group
#: ``kd_pipeline.datasets`` (a module that calls :func:`register_dataset` on import).
DATASETS: Registry[DatasetSource] = Registry("datasets", "dataset", DatasetError, sort=True)


def register_dataset(
    name: str,
    args: tuple[str, ...],
    help: str,
    options: dict[str, Callable[[str], object]] | tuple[str, ...] | None = None,
) -> Callable:
    """Register a loader ``fn(*args, data_dir=..., **options) -> SourceData`` under ``name``
    in :data:`DATASETS` (a decorator); ``args`` name the spec's positional parts."""

    # Options given by name only keep their values as text; a mapping names each one's parser.
    parsers = {k: str for k in options} if isinstance(options, tuple) else dict(options or {})

    def wrap(fn: Callable[..., SourceData]) -> Callable[..., SourceData]:
        DATASETS.register(name, help, DatasetSource(name, args, fn, help, parsers))
        return fn

    return wrap


@register_dataset(
    "fashion-mnist", ("split",), "the shipped Fashion-MNIST: fashion-mnist:train|test"
)
def _fashion_mnist(split: str, data_dir: str | None = None) -> SourceData:
    directory = shipped_fashion_mnist_dir(data_dir)
    x, y = read_idx_split(directory, split)
    return SourceData(x, y, FASHION_MNIST_CLASSES, {"dir": str(directory)})


@register_dataset("mnist", ("split",), "MNIST from --data-dir or $KD_DATA_DIR: mnist:train|test")
def _mnist(split: str, data_dir: str | None = None) -> SourceData:
    root = data_dir or os.environ.get("KD_DATA_DIR")
    if not root:
        raise DatasetError(
            "mnist needs its IDX files: pass --data-dir DIR or set KD_DATA_DIR to a directory "
            "holding " + ", ".join(n + "[.gz]" for pair in IDX_FILES.values() for n in pair)
        )
    directory = Path(root)
    if (
        find_idx_file(directory / "mnist", IDX_FILES[split][0] if split in IDX_FILES else "")
        is not None
    ):
        directory = directory / "mnist"
    x, y = read_idx_split(directory, split)
    return SourceData(x, y, MNIST_CLASSES, {"dir": str(directory)})


@register_dataset("idx", ("dir", "split"), "any MNIST-style IDX directory: idx:DIR:train|test")
def _idx(directory: str, split: str, data_dir: str | None = None) -> SourceData:
    path = Path(directory)
    if not path.is_dir():
        raise DatasetError(f"idx:{directory}: no such directory")
    x, y = read_idx_split(path, split)
    n_classes = int(y.max()) + 1 if y.size else 0
    return SourceData(x, y, [str(i) for i in range(n_classes)], {"dir": str(path.resolve())})


@register_dataset(
    "npz", ("file", "split"), "arrays x_<split> [, y_<split>] in a .npz: npz:FILE:SPLIT"
)
def _npz(file: str, split: str, data_dir: str | None = None) -> SourceData:
    path = Path(file)
    if not path.is_file():
        raise DatasetError(f"npz:{file}: no such file")
    try:
        # allow_pickle=False: a dataset file is data, never code.
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if f"x_{split}" not in keys:
                raise DatasetError(
                    f"{path}: no array 'x_{split}' for split {split!r}; it holds {sorted(keys)}. "
                    "Expected x_<split> and optionally y_<split>."
                )
            x = np.asarray(z[f"x_{split}"])
            y = np.asarray(z[f"y_{split}"]).astype(np.int64) if f"y_{split}" in keys else None
            names = [str(s) for s in z["class_names"]] if "class_names" in keys else None
            n_classes = int(z["num_classes"]) if "num_classes" in keys else None
            if names is None:
                if n_classes is None:
                    ys = [np.asarray(z[k]) for k in keys if k.startswith("y_")]
                    n_classes = max((int(a.max()) + 1 for a in ys if a.size), default=0)
                names = [str(i) for i in range(n_classes)]
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable .npz file without pickles ({e})") from e
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    if y is not None and y.shape[0] != x.shape[0]:
        raise DatasetError(
            f"{path}: x_{split} has {x.shape[0]} rows but y_{split} has {y.shape[0]}"
        )
    return SourceData(x, y, names, {"file": str(path.resolve())})


register_dataset(
    "folder",
    ("dir", "split"),
    "image folder DIR/SPLIT/CLASS/*.png|jpg: folder:DIR:SPLIT[:size=S:crop=C:mode=rgb|grey]",
    lazy_sources.IMAGE_OPTIONS,
)(lazy_sources.load_folder)
# "hf" (images and arrays, or text with text=COLUMN) is registered by pipeline.sequences.hf_text,
# which chooses between the two sources.
register_dataset("py", ("module", "factory"), "a user's torch Dataset: py:package.module:factory")(
    lazy_sources.load_py
)


# ------------------------------------------------------------------------------------- spec parsing
def _parse_int_list(key: str, value: str, spec: str) -> list[int]:
    try:
        values = sorted({int(v) for v in value.split(",") if v != ""})
    except ValueError:
        values = []
    if not values:
        raise DatasetError(
            f"{spec}: {key}= expects class indices like {key}=3 or {key}=0,1; found {value!r}"
        )
    return values


def parse_spec(spec: str) -> tuple[DatasetSource, list[str], dict]:
    """Split ``spec`` into its source, positional args and modifiers (validated)."""
    parts = spec.split(":")
    name = parts[0]
    source = DATASETS.get(name, where=f" in spec {spec!r}")
    n = len(source.args)
    args = parts[1 : 1 + n]
    if len(args) != n or any("=" in a for a in args):
        raise DatasetError(
            f"dataset spec {spec!r}: {name} expects "
            f"{name}:{':'.join(a.upper() for a in source.args)}"
        )
    mods: dict = {}
    for item in parts[1 + n :]:
        key, eq, value = item.partition("=")
        if eq and key in source.options:
            try:
                mods[key] = source.options[key](value)
            except (ValueError, DatasetError) as e:
                raise DatasetError(f"dataset spec {spec!r}: bad {key}={value!r} ({e})") from None
            continue
        if not eq or key not in MODIFIER_KEYS:
            raise DatasetError(
                f"dataset spec {spec!r}: unknown modifier {item!r}; expected key=value with key in "
                f"{', '.join((*source.options, *MODIFIER_KEYS))} "
                "(e.g. fashion-mnist:train:exclude=3:fraction=0.03:seed=0)"
            )
        if key in source.options:
            mods[key] = value  # the source checks its own options
        elif key in ("exclude", "keep"):
            mods[key] = _parse_int_list(key, value, spec)
        elif key in ("fraction", "holdout"):
            try:
                mods[key] = float(value)
            except ValueError:
                raise DatasetError(
                    f"{spec}: {key}= expects a number in (0, 1]; found {value!r}"
                ) from None
            if not 0 < mods[key] <= 1 or (key == "holdout" and mods[key] == 1):
                raise DatasetError(
                    f"{spec}: {key}= expects a number in (0, 1{')' if key == 'holdout' else ']'}; "
                    f"found {value!r}"
                )
        elif key == "part":
            if value not in PARTS:
                raise DatasetError(f"{spec}: part= expects rest or holdout; found {value!r}")
            mods[key] = value
        else:
            try:
                mods[key] = int(value)
            except ValueError:
                raise DatasetError(f"{spec}: {key}= expects an integer; found {value!r}") from None
            if mods[key] < 0:
                raise DatasetError(
                    f"{spec}: {key}= expects a non-negative integer; found {value!r}"
                )
    if "exclude" in mods and "keep" in mods:
        raise DatasetError(f"{spec}: use exclude= or keep=, not both")
    if "fraction" in mods and "count" in mods:
        raise DatasetError(f"{spec}: use fraction= or count=, not both")
    if "part" in mods and "holdout" not in mods:
        raise DatasetError(
            f"{spec}: part= needs holdout=F (the share set aside), e.g. holdout=0.1:part=holdout"
        )
    if "holdout" in mods:
        mods.setdefault("part", "rest")
    return source, args, mods


def canonical_spec(source: DatasetSource, args: list[str], mods: dict) -> str:
    parts = [source.name, *args]
    parts += [f"{key}={mods[key]}" for key in source.options if key in mods]
    for key in MODIFIER_KEYS:
        if key in mods:
            v = mods[key]
            parts.append(f"{key}={','.join(map(str, v)) if isinstance(v, list) else v}")
    return ":".join(parts)


def load_dataset(spec: str, data_dir: str | None = None) -> Dataset:
    """Load a dataset from its spec (see the module docstring for the grammar).

    Raises:
        DatasetError: unknown spec, missing or damaged files, labels that are not class
            indices, modifiers that leave nothing.
    """
    source, args, mods = parse_spec(spec)
    own = {k: mods[k] for k in source.options if k in mods}
    base = source.load(*args, data_dir=data_dir, **own)
    n_classes = len(base.class_names)
    _check_label_range(base.y, n_classes, spec)
    idx = np.arange(base.x.shape[0], dtype=np.int64)
    if "holdout" in mods:
        # Its own random stream ([seed, 1]): the held-out rows do not depend on any later subset's
        # draw.
        k = int(round(mods["holdout"] * idx.size))
        held = np.zeros(idx.size, dtype=bool)
        held[np.random.default_rng([mods.get("seed", 0), 1]).permutation(idx.size)[:k]] = True
        idx = idx[held] if mods["part"] == "holdout" else idx[~held]
    if "exclude" in mods or "keep" in mods:
        if base.y is None:
            raise DatasetError(f"{spec}: exclude=/keep= need labels but this dataset is unlabeled")
        classes = mods.get("exclude") or mods.get("keep")
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad:
            raise DatasetError(
                f"{spec}: classes {bad} out of range; this dataset has classes 0..{n_classes - 1}"
            )
        mask = np.isin(base.y[idx], classes)
        idx = idx[~mask] if "exclude" in mods else idx[mask]
    if "fraction" in mods or "count" in mods:
        k = int(round(mods["fraction"] * idx.size)) if "fraction" in mods else mods["count"]
        if not 0 < k <= idx.size:
            raise DatasetError(
                f"{spec}: the subset would hold {k} samples, but 1..{idx.size} are available"
            )
        rng = np.random.default_rng(mods.get("seed", 0))
        idx = np.sort(rng.choice(idx, size=k, replace=False))
    if idx.size == 0:
        raise DatasetError(f"{spec}: no samples are left after the modifiers")
    whole = idx.size == base.x.shape[0]
    x = base.x if whole else (base.x.take(idx) if is_lazy(base.x) else base.x[idx])
    y = None if base.y is None else (base.y if whole else base.y[idx])
    data = Dataset(
        spec=canonical_spec(source, args, mods),
        x=x,
        y=y,
        ids=idx,
        num_classes=n_classes,
        class_names=list(base.class_names),
        source=base.source,
        modifiers=mods,
    )
    # Sources that finish the dataset themselves (sequences) say so; lazy ones do not.
    extend = getattr(base, "extend", None)
    return data if extend is None else extend(data, idx)


def _check_label_range(y: np.ndarray | None, n_classes: int, spec: str) -> None:
    """Refuse labels that are not class indices ``0..n_classes-1``.

    Any other value is an IndexError (or, wrapped around, the wrong class) in every step that uses
    labels, found only after work was done; checked once on the whole split, before modifiers.

    Args:
        y: (N,) labels of the unmodified split (row i has sample id i), or None.
    """
    if y is None or not y.size:
        return
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if bad.size:
        raise DatasetError(
            f"{spec}: {bad.size} labels are outside 0..{n_classes - 1} (sample ids "
            f"{bad[:5].tolist()} have {y[bad[:5]].tolist()}); labels must be class indices. Fix "
            "the labels, or declare the classes (num_classes or class_names in an .npz)"
        )


def load_eval_dataset(
    spec: str, data_dir: str | None, like: Dataset, num_classes: int | None = None
) -> Dataset:
    """Load a labeled evaluation set and check it fits models trained on ``like`` (sample shape,
    classes).

    Raises:
        DatasetError: unlabeled, or samples / class count that differ from the training data's.
    """
    data = load_dataset(spec, data_dir)
    classes = like.num_classes if num_classes is None else num_classes
    if not data.labeled:
        raise DatasetError(
            f"evaluation set {spec} has no labels; give a labeled set such as fashion-mnist:test"
        )
    if data.sample_shape != like.sample_shape or data.num_classes != classes:
        raise DatasetError(
            f"evaluation set {data.spec} has samples of shape {data.sample_shape} and "
            f"{data.num_classes} classes, but the models are for {like.spec}: "
            f"shape {like.sample_shape}, {classes} classes; pass a matching "
            "--eval (or '' to skip evaluation)"
        )
    return data


def default_eval_spec(spec: str) -> str | None:
    """The test split matching a transfer set's spec (``fashion-mnist:train:...`` ->
    ``fashion-mnist:test``).
    """
    try:
        source, args, mods = parse_spec(spec)
    except DatasetError:
        return None
    if not args or args[-1] != "train":
        return None
    # The source's own options (a sequence length, a tokenizer) describe the test split too.
    own = [f"{k}={mods[k]}" for k in source.options if k in mods]
    return ":".join([source.name, *args[:-1], "test", *own])


def resolve_eval_set(
    eval_spec: str | None,
    train: Dataset,
    data_dir: str | None = None,
    num_classes: int | None = None,
    *,
    required: bool = False,
    log: Callable[[str], None] | None = None,
) -> Dataset | None:
    """A step's labeled evaluation set (``--eval``), resolved the one way every step resolves it.

    - ``None`` (the default): the training set's own test split (``NAME[:ARGS]:train[:...]`` ->
      ``NAME[:ARGS]:test``, modifiers dropped) when it has a usable one. A spec whose split is not
      ``train`` has none; a test split that does not load or fit is a warning through ``log`` and
      no evaluation, not an error: nobody asked for that split by name.
    - ``''``: no evaluation.
    - any other spec: that set, which must load, be labeled and fit (else ``DatasetError``).

    Args:
        eval_spec: ``--eval`` as given.
        train: the data the models train on (the default's source; sample shape and classes).
        data_dir: ``--data-dir``, for specs that need files.
        num_classes: the models' class count when it is not ``train``'s (a cache's).
        required: the step cannot run without a test set (``specialists evaluate``): where the
            rules above give none, raise ``ConfigError`` (an unusable default split raises its
            ``DatasetError``).
        log: where the warning about an unusable default split goes.

    Returns:
        The evaluation set, or None for no evaluation.
    """
    if eval_spec == "":
        if required:
            raise ConfigError(
                [
                    "this step needs a labeled test set, and --eval '' asks for none; "
                    "pass --eval SPEC, or leave it out for the transfer set's test "
                    "split"
                ]
            )
        return None
    if eval_spec is not None:
        return load_eval_dataset(eval_spec, data_dir, train, num_classes)
    guess = default_eval_spec(train.spec)
    if guess is None:
        if required:
            raise ConfigError(
                [f"no test split for {train.spec}; pass --eval SPEC (a labeled test set)"]
            )
        return None
    try:
        return load_eval_dataset(guess, data_dir, train, num_classes)
    except DatasetError as e:
        if required:
            raise
        if log is not None:
            log(f"warning: no evaluation set ({e}); pass --eval SPEC to name one")
        return None
