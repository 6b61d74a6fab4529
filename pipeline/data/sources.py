"""Lazy dataset sources: image folders, Hugging Face datasets on disk, a user's torch Dataset.

Each loader returns a :class:`LazyBase` (the unmodified split: lazy inputs, labels, class names,
where it came from); :mod:`pipeline.datasets` registers them, so the modifiers (holdout, exclude /
keep, fraction / count with seed) and sample ids work as for in-memory sources.

- ``folder:DIR:SPLIT[:size=S][:crop=C][:mode=rgb|grey]``: ``DIR/SPLIT/CLASS/**/*.png|jpg|...``,
  classes from the sorted directory names, rows in the order of the sorted relative paths. Each
  image is decoded with Pillow, converted to ``mode``, its shorter side resized to ``size``
  (bilinear) and centre-cropped to ``crop`` x ``crop`` (default ``size``): (C, crop, crop) uint8.
  Without ``size`` every image must have the first one's size.
- ``hf:DIR:SPLIT[:x=image][:y=label][:size=S][:crop=C][:mode=...]``: a ``datasets`` dataset saved
  with ``save_to_disk`` (``DIR`` holding a DatasetDict, or ``DIR/SPLIT`` a Dataset) or parquet files
  (``DIR/SPLIT/*.parquet``, ``DIR/SPLIT-*.parquet``), memory-mapped, offline. Image columns are
  preprocessed like folder images; array columns are taken as they are. (With ``text=COLUMN``
  the ``hf:`` prefix is the text source of :mod:`pipeline.sequences.hf_text` instead.)
- ``py:package.module:factory``: ``factory()`` returns a map-style torch ``Dataset`` whose items are
  ``(input, label)`` or inputs alone (unlabeled). Labels come from its ``targets`` (or ``labels``)
  attribute when it has one, else from one pass over the items; class names from ``classes``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.lazy import LazyInputs, RowSource
from pipeline.errors import DatasetError, KDError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODES = {"rgb": "RGB", "grey": "L", "gray": "L"}
IMAGE_OPTIONS = ("size", "crop", "mode")
HF_OPTIONS = ("x", "y", *IMAGE_OPTIONS)


@dataclass
class LazyBase:
    """What a lazy source returns: the unmodified split (``x`` decodes when indexed)."""

    x: LazyInputs
    y: np.ndarray | None
    class_names: list[str]
    source: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class ImagePrep:
    """How an image becomes a (C, H, W) uint8 array: mode, shorter side, centre crop."""

    mode: str = "rgb"
    size: int | None = None
    crop: int | None = None

    @classmethod
    def parse(cls, spec: str, size: str | None, crop: str | None, mode: str | None) -> ImagePrep:
        def positive(key: str, v: str | None) -> int | None:
            if v is None:
                return None
            if not v.isdigit() or int(v) < 1:
                raise DatasetError(f"{spec}: {key}= expects a positive integer; found {v!r}")
            return int(v)

        if mode is not None and mode not in MODES:
            raise DatasetError(f"{spec}: mode= expects rgb or grey; found {mode!r}")
        s, c = positive("size", size), positive("crop", crop)
        if c is not None and s is None:
            raise DatasetError(f"{spec}: crop= needs size= (the shorter side before cropping)")
        if c is not None and s is not None and c > s:
            raise DatasetError(f"{spec}: crop={c} is larger than size={s}")
        return cls(mode or "rgb", s, c if c is not None else s)

    @property
    def channels(self) -> int:
        return 1 if MODES[self.mode] == "L" else 3

    def record(self) -> dict:
        return {"mode": self.mode, "size": self.size, "crop": self.crop, "resample": "bilinear"}

    def apply(self, image: Any, where: str) -> np.ndarray:
        """A PIL image -> (C, H, W) uint8."""
        from PIL import Image

        img = image.convert(MODES[self.mode])
        if self.size is not None:
            w, h = img.size
            scale = self.size / min(w, h)
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - self.crop) // 2, (nh - self.crop) // 2
            img = img.crop((left, top, left + self.crop, top + self.crop))
        arr = np.array(img, dtype=np.uint8)  # writable: torch warns about read-only arrays
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DatasetError(
            "image datasets need Pillow, which is not installed: pip install 'kd-pipeline[vision]'"
        ) from None


# ------------------------------------------------------------------------------------------- folder
class FolderSource(RowSource):
    """``DIR/SPLIT/CLASS/...`` image files, in sorted relative-path order."""

    kind = "folder"

    def __init__(self, root: Path, split: str, prep: ImagePrep) -> None:
        self.root, self.split, self.prep = root, split, prep
        top = root / split
        self.classes = sorted(d.name for d in top.iterdir() if d.is_dir())
        paths: list[str] = []
        labels: list[int] = []
        for c, name in enumerate(self.classes):
            found = []
            for dirpath, _, files in os.walk(top / name):
                rel = Path(dirpath).relative_to(top).as_posix()
                found += [f"{rel}/{f}" for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
            paths += found
            labels += [c] * len(found)
        order = np.argsort(np.asarray(paths, dtype=object), kind="stable") if paths else []
        # One fixed-width bytes array: a million names cost tens of MB, not a list of strings.
        self.paths = np.asarray([paths[i] for i in order], dtype=np.bytes_)
        self.labels = np.asarray([labels[i] for i in order], dtype=np.int64)
        self.n = len(self.paths)
        if self.n == 0:
            raise DatasetError(
                f"folder:{root}:{split}: no images (*{', *'.join(IMAGE_SUFFIXES)}) under "
                f"{top}/CLASS/; expected the layout DIR/SPLIT/CLASS/IMAGE"
            )
        if prep.crop is not None:
            self.sample_shape = (prep.channels, prep.crop, prep.crop)
        else:
            self.sample_shape = tuple(int(d) for d in self._decode(0).shape)

    def path(self, i: int) -> Path:
        return self.root / self.split / self.paths[i].decode()

    def name(self, i: int) -> str:
        return str(self.path(i))

    def _decode(self, i: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.path(i)
        try:
            with Image.open(path) as img:
                return self.prep.apply(img, str(path))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DatasetError(f"{path}: cannot decode this image ({e}); fix or remove it") from e

    def load(self, i: int) -> np.ndarray:
        arr = self._decode(i)
        if arr.shape != self.sample_shape:
            raise DatasetError(
                f"{self.path(i)}: decodes to {arr.shape}, the dataset's images are "
                f"{self.sample_shape}; give size=S (and crop=C) to resize every image"
            )
        return arr

    def manifest(self) -> dict:
        names = hashlib.sha256(b"\n".join(self.paths.tolist())).hexdigest()
        return {
            "kind": "folder",
            "split": self.split,
            "classes": self.classes,
            "files": self.n,
            "names_sha256": names,
            "preprocess": self.prep.record(),
        }


def load_folder(
    directory: str,
    split: str,
    data_dir: str | None = None,
    size: str | None = None,
    crop: str | None = None,
    mode: str | None = None,
) -> LazyBase:
    spec = f"folder:{directory}:{split}"
    root = Path(directory)
    if not (root / split).is_dir():
        raise DatasetError(
            f"{spec}: no directory {root / split}; expected the layout DIR/SPLIT/CLASS/IMAGE"
        )
    _pillow()
    src = FolderSource(root, split, ImagePrep.parse(spec, size, crop, mode))
    return LazyBase(LazyInputs(src), src.labels, src.classes, {"dir": str(root.resolve())})


# ---------------------------------------------------------------------------------------------- hf
class HFSource(RowSource):
    """One column of a memory-mapped ``datasets.Dataset`` (its other columns are never read)."""

    kind = "hf"

    def __init__(self, ds: Any, split: str, x: str, prep: ImagePrep, where: str) -> None:
        self.ds, self.split, self.x, self.prep, self.where = ds, split, x, prep, where
        self.n = len(ds)
        first = self._decode(0)
        self.sample_shape = tuple(int(d) for d in first.shape)
        self.dtype = first.dtype
        self.features = str(ds.features[x])

    def _decode(self, i: int) -> np.ndarray:
        value = self.ds[int(i)][self.x]
        if hasattr(value, "convert"):  # a PIL image (an Image feature)
            return self.prep.apply(value, self.name(i))
        arr = np.asarray(value)
        if arr.dtype.kind in "iub" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            return arr.astype(np.uint8)
        return arr.astype(np.float32)

    def load(self, i: int) -> np.ndarray:
        arr = self._decode(i)
        if arr.shape != self.sample_shape:
            raise DatasetError(
                f"{self.name(i)}: decodes to {arr.shape}, the first row to {self.sample_shape}; "
                "give size=S to resize images, or use a column of one shape"
            )
        return arr.astype(self.dtype, copy=False)

    def name(self, i: int) -> str:
        return f"{self.where} row {i} (column {self.x})"

    def manifest(self) -> dict:
        return {
            "kind": "hf",
            "split": self.split,
            "column": self.x,
            "features": self.features,
            "rows": self.n,
            "preprocess": self.prep.record(),
        }


def import_datasets(spec: str) -> Any:
    """The ``datasets`` package, offline (never a download), or one message saying why it
    cannot be used (not installed; or failing to import, with the likely cause).

    Raises:
        DatasetError: it cannot be imported.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never a download
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{spec}: hf: sources need the `datasets` package, which is not installed: "
            "pip install 'kd-pipeline[hf]'"
        ) from None
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision built for another torch
        from pipeline.tv import torchvision_problem

        problem = torchvision_problem()
        raise DatasetError(
            f"{spec}: cannot import the `datasets` package ({type(e).__name__}: {e})"
            + (f"; the likely cause: {problem}" if problem else "")
        ) from None
    return datasets


def _hf_open(root: Path, split: str, spec: str) -> Any:
    """The split as a memory-mapped ``datasets.Dataset``, from local files only."""
    datasets = import_datasets(spec)
    if (root / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(root))
        if split not in dd:
            raise DatasetError(f"{spec}: {root} holds splits {sorted(dd)}, not {split!r}")
        return dd[split]
    if (root / split / "state.json").is_file():
        return datasets.load_from_disk(str(root / split))
    files = sorted((root / split).glob("*.parquet")) + sorted(root.glob(f"{split}-*.parquet"))
    files += sorted(root.glob(f"{split}.parquet"))
    if files:
        return datasets.Dataset.from_parquet([str(f) for f in files])
    raise DatasetError(
        f"{spec}: no Hugging Face dataset for split {split!r} in {root}; expected a directory "
        "written by save_to_disk (DIR/dataset_dict.json or DIR/SPLIT/state.json) or parquet files "
        "(DIR/SPLIT/*.parquet, DIR/SPLIT-*.parquet)"
    )


def load_hf(
    directory: str,
    split: str,
    data_dir: str | None = None,
    x: str | None = None,
    y: str | None = None,
    size: str | None = None,
    crop: str | None = None,
    mode: str | None = None,
) -> LazyBase:
    spec = f"hf:{directory}:{split}"
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"{spec}: no such directory {root}")
    ds = _hf_open(root, split, spec)
    xcol, ycol = x or "image", y or "label"
    cols = list(ds.column_names)
    if xcol not in cols:
        raise DatasetError(f"{spec}: no input column {xcol!r}; columns: {cols}; choose with x=NAME")
    labels = names = None
    if ycol in cols:
        labels = np.asarray(ds.data.column(ycol).to_numpy(), dtype=np.int64)
        feature = ds.features[ycol]
        names = list(getattr(feature, "names", None) or [])
    elif y is not None:
        raise DatasetError(f"{spec}: no label column {ycol!r}; columns: {cols}")
    if not names:
        names = [str(i) for i in range(int(labels.max()) + 1 if labels is not None else 0)]
    src = HFSource(
        ds.select_columns([xcol]), split, xcol, ImagePrep.parse(spec, size, crop, mode), spec
    )
    return LazyBase(LazyInputs(src), labels, names, {"dir": str(root.resolve())})


# ---------------------------------------------------------------------------------------------- py
class PySource(RowSource):
    """A user's map-style torch Dataset: item i is (input, label) or the input alone."""

    kind = "py"

    def __init__(self, ds: Any, factory: str) -> None:
        self.ds, self.factory = ds, factory
        self.n = len(ds)
        first = self._input(0)
        self.sample_shape = tuple(int(d) for d in first.shape)
        self.dtype = first.dtype

    def _input(self, i: int) -> np.ndarray:
        # The user's __getitem__ may fail or return anything: name their code and what it did,
        # not a traceback from inside the loader.
        item = user_call(f"py:{self.factory}: item {i} (its __getitem__)", self.ds.__getitem__, i)
        value = item[0] if isinstance(item, (tuple, list)) else item
        arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        if arr.dtype.kind not in "buif" or arr.ndim == 0:
            raise DatasetError(
                f"py:{self.factory}: item {i} holds {type(value).__name__} {_short(value)}, not "
                "an array or tensor of numbers; return (input, label) or the input alone, the "
                "input a numpy array or torch tensor"
            )
        return arr if arr.dtype == np.uint8 else arr.astype(np.float32)

    def load(self, i: int) -> np.ndarray:
        arr = self._input(i)
        if arr.shape != self.sample_shape:
            raise DatasetError(
                f"{self.name(i)}: the input has shape {arr.shape}, item 0 has "
                f"{self.sample_shape}; every item must have one shape"
            )
        return arr.astype(self.dtype, copy=False)

    def name(self, i: int) -> str:
        return f"py:{self.factory} item {i}"

    def manifest(self) -> dict:
        return {
            "kind": "py",
            "factory": self.factory,
            "rows": self.n,
            "sample_shape": list(self.sample_shape),
            "dtype": self.dtype.str,
        }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def user_call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, a user's code: whatever it raises becomes one ``DatasetError`` naming
    ``what`` failed and the exception (the user's bug, said as such, not kd-pipeline's)."""
    try:
        return fn(*args)
    except KDError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: anything may come out of it
        raise DatasetError(
            f"{what} raised {type(e).__name__}: {e}; fix that code (the error is in it, not in "
            "kd-pipeline)"
        ) from e


def load_py(module: str, factory: str, data_dir: str | None = None) -> LazyBase:
    spec = f"py:{module}:{factory}"
    try:
        fn = getattr(importlib.import_module(module), factory)
    except (ImportError, AttributeError) as e:
        raise DatasetError(f"{spec}: cannot import {module}.{factory} ({e})") from e
    except Exception as e:  # noqa: BLE001 - the module's own code ran on import
        raise DatasetError(
            f"{spec}: importing module {module} raised {type(e).__name__}: {e}; fix that module"
        ) from e
    ds = user_call(f"{spec}: the factory {module}.{factory}()", fn)
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise DatasetError(
            f"{spec}: the factory returned {type(ds).__name__}, not a map-style Dataset "
            "(__len__ and __getitem__)"
        )
    if user_call(f"{spec}: len() of the factory's dataset", len, ds) == 0:
        raise DatasetError(f"{spec}: the dataset is empty")
    src = PySource(ds, f"{module}:{factory}")
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = getattr(ds, "labels", None)
    if labels is None and isinstance(ds[0], (tuple, list)) and len(ds[0]) > 1:
        # One pass: the labels are not exposed. Each must be a class index (an int).
        labels = [
            user_call(f"{spec}: the label of item {i}", lambda i=i: int(ds[i][1]))
            for i in range(len(ds))
        ]
    y = (
        None
        if labels is None
        else user_call(
            f"{spec}: its labels as class indices",
            lambda: np.asarray(labels, dtype=np.int64).reshape(-1),
        )
    )
    if y is not None and len(y) != src.n:
        raise DatasetError(f"{spec}: {len(y)} labels for {src.n} items")
    names = [str(c) for c in getattr(ds, "classes", None) or []]
    if not names:
        names = [str(i) for i in range(int(y.max()) + 1 if y is not None else 0)]
    return LazyBase(LazyInputs(src), y, names, {"factory": f"{module}:{factory}"})
