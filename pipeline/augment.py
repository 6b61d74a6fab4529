"""Image augmentations with explicit parameters: a registry of composable transforms.

A transform's contract has two halves, kept apart on purpose:

- ``draw(u, shape)``: turn uniforms ``u`` (n, DRAWS) in [0, 1) into explicit parameters (n, P)
  float32 (a shift in pixels, a flip bit, a crop box...). The uniforms come either from a
  counter-based hash of (seed, sample id, view, draw) (:func:`view_uniforms`: a cache's views, the
  same on resume and on any worker), or from a numpy ``Generator`` (live augmentation).
- ``apply(x, params)``: transform a batch of inputs (n, C, H, W) with those parameters, exactly:
  only indexing and elementwise float arithmetic, so the same parameters give the same bytes
  every time, on any machine. This is what lets a view cache store numbers instead of a seed
  (a seed forks the augmentation code's RNG consumption; numbers are replayed by any version
  that keeps :data:`AUGMENT_VERSION`'s semantics).

Specs compose transforms with ``+``; a transform's arguments follow its name after ``:``
(positional or ``key=value``; a value may be a comma list)::

    shift:2                 +-2-pixel translation, zero fill (the paper's jitter)
    crop:pad=4+flip         random 28x28 crop of the zero-padded image, then a horizontal flip
    rrc:scale=0.35,1+flip   random resized crop (area 35-100 %, aspect 3/4-4/3), then a flip

A new transform is one :data:`TRANSFORMS` entry (``@TRANSFORMS.register``). This module
imports without torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from pipeline.errors import ConfigError
from pipeline.registry import Registry

AUGMENT_VERSION = 1  # the semantics of every transform's parameters; bump when one changes


# ------------------------------------------------------------------------------------- transforms
#: Transform names -> their classes (the spec syntax and the CLI offer them); plug-ins from the
#: entry point group ``kd_pipeline.augmentations``.
TRANSFORMS: Registry[type[Transform]] = Registry(
    "augmentations", "transform", lambda message: ConfigError([message])
)


@dataclass(frozen=True)
class Transform:
    """One registered transform with its arguments resolved.

    Subclasses set ``NAME``, ``PARAMS`` (the parameter names, in order), ``DRAWS`` (uniforms per
    view) and implement :meth:`draw`, :meth:`identity` and :meth:`apply`.
    """

    NAME: ClassVar[str] = ""
    PARAMS: ClassVar[tuple[str, ...]] = ()
    DRAWS: ClassVar[int] = 0

    def args(self) -> dict[str, Any]:
        """The resolved arguments, as the canonical spec and the header record them."""
        return {k: v for k, v in self.__dict__.items()}

    def text(self) -> str:
        args = self.args()
        if not args:
            return self.NAME
        parts = [
            f"{k}={','.join(_num(x) for x in v) if isinstance(v, tuple) else _num(v)}"
            for k, v in args.items()
        ]
        return self.NAME + ":" + ":".join(parts)

    def draw(self, u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Parameters (n, P) float32 from uniforms ``u`` (n, DRAWS), images of ``shape`` (H, W)."""
        raise NotImplementedError

    def identity(self, n: int, shape: tuple[int, int]) -> np.ndarray:
        """(n, P) float32 parameters that leave an image unchanged."""
        raise NotImplementedError

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        """(n, C, H, W) float32 inputs transformed by ``params`` (n, P) -> (n, C, H, W) float32."""
        raise NotImplementedError


def _num(v: float) -> str:
    """Integers plainly, other numbers in full (the canonical text re-parses to the same draws)."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _translate(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, pad: int) -> np.ndarray:
    """Each image's content moved down by ``dy`` and right by ``dx`` pixels (|d| <= pad), zero
    fill: one slice per distinct offset, as ``sources.random_shift`` does."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty_like(x)
    key = (dy + pad) * (2 * pad + 1) + (dx + pad)
    for k in np.unique(key):
        oy, ox = divmod(int(k), 2 * pad + 1)  # oy = dy + pad
        sel = np.flatnonzero(key == k)
        out[sel] = padded[sel, :, 2 * pad - oy : 2 * pad - oy + h, 2 * pad - ox : 2 * pad - ox + w]
    return out


@TRANSFORMS.register("shift", "shift:S translate by up to S pixels, zero fill")
@dataclass(frozen=True)
class Shift(Transform):
    """``shift:S``: translate by an integer (dy, dx) uniform in [-S, S]^2, zero fill."""

    NAME: ClassVar[str] = "shift"
    PARAMS: ClassVar[tuple[str, ...]] = ("dy", "dx")
    DRAWS: ClassVar[int] = 2
    max: int = 2

    def draw(self, u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        d = np.floor(u * (2 * self.max + 1)).astype(np.int64) - self.max
        return np.minimum(d, self.max).astype(np.float32)  # u < 1, so only a guard

    def identity(self, n: int, shape: tuple[int, int]) -> np.ndarray:
        return np.zeros((n, 2), np.float32)

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        p = params.astype(np.int64)
        return _translate(x, p[:, 0], p[:, 1], self.max) if self.max else x.copy()


@TRANSFORMS.register("crop", "crop:pad=P a crop of the zero-padded image (RandomCrop(padding=P))")
@dataclass(frozen=True)
class Crop(Transform):
    """``crop:pad=P``: an H x W crop of the image zero-padded by P, at a uniform offset (top, left)
    in [0, 2P] (torchvision's ``RandomCrop(padding=P)``)."""

    NAME: ClassVar[str] = "crop"
    PARAMS: ClassVar[tuple[str, ...]] = ("top", "left")
    DRAWS: ClassVar[int] = 2
    pad: int = 4

    def draw(self, u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        o = np.floor(u * (2 * self.pad + 1)).astype(np.int64)
        return np.minimum(o, 2 * self.pad).astype(np.float32)

    def identity(self, n: int, shape: tuple[int, int]) -> np.ndarray:
        return np.full((n, 2), self.pad, np.float32)

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        p = params.astype(np.int64)  # a crop at (top, left) moves content by (pad - top, ...)
        return _translate(x, self.pad - p[:, 0], self.pad - p[:, 1], self.pad)


@TRANSFORMS.register("flip", "flip[:p=0.5] mirror left-right with probability p")
@dataclass(frozen=True)
class Flip(Transform):
    """``flip[:p=0.5]``: mirror left-right with probability p (parameter: 1 flipped, 0 not)."""

    NAME: ClassVar[str] = "flip"
    PARAMS: ClassVar[tuple[str, ...]] = ("on",)
    DRAWS: ClassVar[int] = 1
    p: float = 0.5

    def draw(self, u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return (u < self.p).astype(np.float32)

    def identity(self, n: int, shape: tuple[int, int]) -> np.ndarray:
        return np.zeros((n, 1), np.float32)

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        out = x.copy()
        on = params[:, 0] > 0.5
        out[on] = x[on][..., ::-1]
        return out


@TRANSFORMS.register("rrc", "rrc:scale=LO,HI[:ratio=LO,HI] RandomResizedCrop to the input size")
@dataclass(frozen=True)
class ResizedCrop(Transform):
    """``rrc:scale=LO,HI[:ratio=LO,HI]``: torchvision's ``RandomResizedCrop`` to the input size.

    A box of area ``scale`` x the image's and aspect ratio log-uniform in ``ratio`` (ten tries,
    then the largest centred box of an allowed ratio), resampled bilinearly (half-pixel centres,
    edge clamped) back to H x W. Parameters: the box (top, left, height, width) in pixels.
    """

    NAME: ClassVar[str] = "rrc"
    PARAMS: ClassVar[tuple[str, ...]] = ("top", "left", "height", "width")
    TRIES: ClassVar[int] = 10
    DRAWS: ClassVar[int] = 4 * 10
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        n = u.shape[0]
        out = np.zeros((n, 4), np.float64)
        found = np.zeros(n, bool)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for t in range(self.TRIES):
            area = h * w * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 4 * t])
            ratio = np.exp(lo + (hi - lo) * u[:, 4 * t + 1])
            bw = np.round(np.sqrt(area * ratio))
            bh = np.round(np.sqrt(area / ratio))
            ok = ~found & (bw >= 1) & (bh >= 1) & (bw <= w) & (bh <= h)
            top = np.floor(u[:, 4 * t + 2] * (h - bh + 1))
            left = np.floor(u[:, 4 * t + 3] * (w - bw + 1))
            out[ok] = np.stack([top, left, bh, bw], axis=1)[ok]
            found |= ok
        if not found.all():  # torchvision's fallback: a centred box of the nearest allowed ratio
            r = min(max(w / h, self.ratio[0]), self.ratio[1])
            bw, bh = (w, round(w / r)) if w / h < r else (round(h * r), h) if w / h > r else (w, h)
            bw, bh = min(bw, w), min(bh, h)
            out[~found] = [(h - bh) // 2, (w - bw) // 2, bh, bw]
        return out.astype(np.float32)

    def identity(self, n: int, shape: tuple[int, int]) -> np.ndarray:
        return np.tile(np.array([0, 0, shape[0], shape[1]], np.float32), (n, 1))

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        n, c, h, w = x.shape
        p = params.astype(np.float64)
        ys, y_w = _sample_grid(p[:, 0], p[:, 2], h)  # (n, H) rows, (n, H, 2) weights
        xs, x_w = _sample_grid(p[:, 1], p[:, 3], w)
        idx = np.arange(n)[:, None, None]
        out = np.zeros((n, c, h, w), np.float32)
        for a in range(2):
            for b in range(2):
                # (n, H, W, C) gathered source pixels, weighted; the four corners in a fixed order
                src = x[idx, :, ys[:, :, a, None], xs[:, None, :, b]]
                weight = (y_w[:, :, a, None] * x_w[:, None, :, b]).astype(np.float32)
                out += np.moveaxis(src * weight[..., None], -1, 1)
        return out


def _sample_grid(start: np.ndarray, size: np.ndarray, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear source indices (n, out, 2) and weights (n, out, 2) along one axis for boxes
    [start, start + size) resampled to ``out`` pixels (half-pixel centres, edges clamped). An
    identity box gives weights (1, 0) exactly, so the crop of the whole image is the image."""
    i = np.arange(out, dtype=np.float64)
    pos = start[:, None] + (i[None, :] + 0.5) * (size[:, None] / out) - 0.5
    limit = out - 1
    pos = np.clip(pos, 0, limit)
    lo = np.floor(pos)
    frac = pos - lo
    lo = lo.astype(np.int64)
    hi = np.minimum(lo + 1, limit)
    return np.stack([lo, hi], -1), np.stack([1 - frac, frac], -1)


# ----------------------------------------------------------------------------------- composition
@dataclass(frozen=True)
class Augment:
    """A composition of transforms, applied in order; its parameters are theirs, concatenated.

    Attributes:
        transforms: the transforms, in order.
    """

    transforms: tuple[Transform, ...]

    @property
    def text(self) -> str:
        """The canonical spec (every argument spelled out): what the header records."""
        return "+".join(t.text() for t in self.transforms)

    @property
    def params(self) -> list[str]:
        """The parameter schema: ``<transform>.<name>`` per column, e.g. ``crop.top``."""
        return [f"{t.NAME}.{p}" for t in self.transforms for p in t.PARAMS]

    @property
    def draws(self) -> int:
        return sum(t.DRAWS for t in self.transforms)

    def record(self) -> dict:
        """The header's description of the augmentation (spec, version, parameter schema)."""
        return {
            "spec": self.text,
            "version": AUGMENT_VERSION,
            "params": self.params,
            "transforms": [{"name": t.NAME, **_json_args(t.args())} for t in self.transforms],
        }

    def draw(self, u: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(n, P) float32 parameters from uniforms (n, draws)."""
        cols, at = [], 0
        for t in self.transforms:
            cols.append(t.draw(u[:, at : at + t.DRAWS], shape))
            at += t.DRAWS
        return np.concatenate(cols, axis=1).astype(np.float32)

    def identity(self, n: int, shape: tuple[int, int]) -> np.ndarray:
        return np.concatenate([t.identity(n, shape) for t in self.transforms], axis=1)

    def apply(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Replay ``params`` (n, P) on inputs (n, C, H, W) of any dtype -> (n, C, H, W) float32.

        Raises:
            ConfigError: inputs that are not images (n, C, H, W), or params of another width.
        """
        x = np.asarray(x)
        if x.ndim != 4:
            raise ConfigError(
                [
                    f"augmentation {self.text} transforms images (N, C, H, W); the inputs have "
                    f"shape {tuple(x.shape)}"
                ]
            )
        if params.shape != (x.shape[0], len(self.params)):
            raise ConfigError(
                [
                    f"augmentation {self.text} takes {len(self.params)} parameters per view "
                    f"({', '.join(self.params)}); got an array of shape {params.shape}"
                ]
            )
        out = x.astype(np.float32, copy=True)
        at = 0
        for t in self.transforms:
            k = len(t.PARAMS)
            out = t.apply(out, params[:, at : at + k])
            at += k
        return out

    def random(self, n: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Fresh parameters (n, P) for live augmentation, from ``rng``."""
        return self.draw(rng.random((n, self.draws)), shape)


def _json_args(args: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def parse_augment(spec: str) -> Augment:
    """``crop:pad=4+flip`` -> :class:`Augment`.

    Raises:
        ConfigError: an unknown transform or argument, or a value of the wrong kind.
    """
    if not spec or not spec.strip():
        raise ConfigError([f"--augment: expected a spec such as {EXAMPLE}, got {spec!r}"])
    out = []
    for part in spec.strip().split("+"):
        name, *args = part.strip().split(":")
        cls = TRANSFORMS.get(name, where=f" in --augment {spec}")
        out.append(_build(cls, args, spec))
    return Augment(tuple(out))


def augment_problems(spec: str | None) -> list[str]:
    """What is wrong with an --augment spec (nothing when it parses or is not given)."""
    if spec is None:
        return []
    try:
        parse_augment(spec)
    except ConfigError as e:
        return list(e.problems)
    return []


EXAMPLE = "shift:2, crop:pad=4+flip or rrc:scale=0.35,1+flip"


def _build(cls: type[Transform], args: Sequence[str], spec: str) -> Transform:
    fields = list(dataclasses.fields(cls))
    kwargs: dict[str, Any] = {}
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if not eq:
            if i >= len(fields):
                raise ConfigError([f"--augment {spec}: {cls.NAME} takes no argument {arg!r}"])
            key, value = fields[i].name, arg
        f = next((f for f in fields if f.name == key), None)
        if f is None:
            names = ", ".join(f.name for f in fields) or "none"
            raise ConfigError(
                [f"--augment {spec}: {cls.NAME} has no argument {key!r} (it takes: {names})"]
            )
        default = f.default
        try:
            if isinstance(default, tuple):
                parts = tuple(float(v) for v in value.split(","))
                if len(parts) != len(default):
                    raise ValueError
                kwargs[key] = parts
            else:
                kwargs[key] = type(default)(value)
        except ValueError:
            want = (
                f"{len(default)} comma-separated numbers"
                if isinstance(default, tuple)
                else (type(default).__name__)
            )
            raise ConfigError(
                [f"--augment {spec}: {cls.NAME} {key}={value!r} should be {want}"]
            ) from None
    t = cls(**kwargs)
    problems = _argument_problems(t)
    if problems:
        raise ConfigError([f"--augment {spec}: {p}" for p in problems])
    return t


def _argument_problems(t: Transform) -> list[str]:
    if isinstance(t, Shift) and t.max < 0:
        return [f"shift {t.max} must be >= 0 pixels"]
    if isinstance(t, Crop) and t.pad < 0:
        return [f"crop pad={t.pad} must be >= 0 pixels"]
    if isinstance(t, Flip) and not 0 <= t.p <= 1:
        return [f"flip p={t.p} must be within 0..1"]
    if isinstance(t, ResizedCrop):
        (a, b), (r, s) = t.scale, t.ratio
        if not 0 < a <= b <= 1 or not 0 < r <= s:
            return [f"rrc scale={a:g},{b:g} needs 0 < lo <= hi <= 1 and ratio 0 < lo <= hi"]
    return []


# ------------------------------------------------------------------------------ views of a cache
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (uint64 arithmetic wraps, as the algorithm intends)."""
    z = (z + _GAMMA).astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def view_uniforms(seed: int, ids: np.ndarray, views: int, draws: int) -> np.ndarray:
    """Uniforms in [0, 1) for each (sample id, view, draw): (n, views, draws) float64.

    A counter-based generator keyed by (cache seed, sample id, view, draw): a view's draws depend
    on nothing else, so a resumed write, any dask worker and any shard size draw the same, and
    drawing 60,000 x 16 views is one vectorised pass instead of a million seeded Generators.
    """
    with np.errstate(over="ignore"):
        key = _mix(np.full(1, np.uint64(seed % (1 << 64))))
        z = _mix(key ^ np.asarray(ids, dtype=np.int64).astype(np.uint64))[:, None, None]
        z = _mix(z ^ np.arange(views, dtype=np.uint64)[None, :, None])
        z = _mix(z ^ np.arange(draws, dtype=np.uint64)[None, None, :] * _GAMMA)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class ViewPlan:
    """The views of a cache: how many per sample, how they are drawn, and the augmentation.

    Plain data (pickled to dask workers). ``include_identity`` makes view 0 the unaugmented input.
    """

    augment: str  # the canonical spec
    views: int
    seed: int = 0
    include_identity: bool = False
    shape: tuple[int, int] = (0, 0)  # (H, W) of the inputs
    pipeline: Augment | None = field(default=None, compare=False, repr=False)

    @classmethod
    def make(
        cls, augment: str, views: int, seed: int, include_identity: bool, shape: tuple[int, int]
    ) -> ViewPlan:
        pipe = parse_augment(augment)
        return cls(pipe.text, views, seed, include_identity, tuple(shape), pipe)

    @classmethod
    def from_record(cls, record: dict, views: int, seed: int, shape: tuple[int, int]) -> ViewPlan:
        """The plan a cache header's ``augment`` record describes.

        Raises:
            ConfigError: the record's augmentation version or parameter schema is not this
                kd-pipeline's (its parameters would be replayed with other semantics).
        """
        plan = cls.make(record["spec"], views, seed, bool(record.get("include_identity")), shape)
        if record.get("version") != AUGMENT_VERSION or list(record.get("params", [])) != (
            plan.augment_pipeline.params
        ):
            raise ConfigError(
                [
                    f"the cache's augmentation {record['spec']} is version "
                    f"{record.get('version')} with parameters {record.get('params')}; this "
                    f"kd-pipeline replays version {AUGMENT_VERSION} with "
                    f"{plan.augment_pipeline.params}: use the kd-pipeline that wrote it"
                ]
            )
        return plan

    @property
    def augment_pipeline(self) -> Augment:
        return self.pipeline if self.pipeline is not None else parse_augment(self.augment)

    def record(self) -> dict:
        """The header's ``augment`` record."""
        return {
            **self.augment_pipeline.record(),
            "include_identity": self.include_identity,
            "draws": "splitmix64(cache seed, sample id, view, draw)",
        }

    def params(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids) * views, P) float32 parameters, rows ordered by sample then view."""
        pipe = self.augment_pipeline
        n = len(ids)
        u = view_uniforms(self.seed, ids, self.views, pipe.draws).reshape(n * self.views, -1)
        p = pipe.draw(u, self.shape).reshape(n, self.views, -1)
        if self.include_identity:
            p[:, 0] = pipe.identity(n, self.shape)
        return p.reshape(n * self.views, -1)

    def inputs(self, x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every view of samples ``x`` (n, C, H, W): ((n * views, C, H, W) float32, params)."""
        params = self.params(ids)
        return self.augment_pipeline.apply(np.repeat(x, self.views, axis=0), params), params


def live_augment(spec: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fresh random parameters for every call (the inconsistent baseline and online KD): inputs
    (B, C, H, W) -> augmented float32, drawn from one ``Generator`` seeded by ``seed``."""
    pipe = parse_augment(spec)
    rng = np.random.default_rng([seed, 0xA6])

    def run(x: np.ndarray) -> np.ndarray:
        return pipe.apply(x, pipe.random(x.shape[0], tuple(x.shape[-2:]), rng))

    return run
