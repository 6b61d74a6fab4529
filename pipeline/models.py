"""Model specs and the model registry.

A model spec is ``NAME[:ARG][:key=value...]``:

- ``mlp:1200,1200`` — ReLU MLP with those hidden widths. Options: ``input_dropout=0.2``,
  ``dropout=0.5``, ``max_norm=15`` (the paper's teacher: dropout on inputs and hidden units, a
  max-norm constraint on each hidden unit's incoming weights).
- ``cnn`` — a small conv net for 1×H×W images. Options: ``channels=32,64``, ``hidden=128``,
  ``dropout=0.25``.
- ``torchscript:PATH`` — a user's TorchScript module (called on normalised inputs).
- ``py:package.module:factory`` — ``factory(in_shape=..., num_classes=...) -> nn.Module``, a user's
  own model.
- ``tv:NAME[:weights=FILE][:norm=imagenet|none][:classes=N]`` — a torchvision architecture
  (``resnet18``, ``mobilenet_v3_small``, ``vit_b_16``, ...), weights from a local file only
  (:mod:`pipeline.tv`).
- ``hf-image:DIR`` — a ``transformers`` image classifier and its image processor saved in DIR,
  the processor's resize and normalisation inside the model (:mod:`pipeline.hf_image`).

The last two run code the spec names. A spec typed on the command line is the user's own choice;
one *recorded* in a checkpoint or a cache was chosen by whoever made that file, so it is built only
when the user allowed its module or file (``--trust-code``, :func:`check_trusted`).

Every built model is a :class:`KDModel`: input normalisation (mean/std buffers recorded from the
training data, saved in the checkpoint) in front of the network, so a checkpoint consumes raw inputs
and no caller has to know how its model was trained.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import hf_image, tv
from pipeline.errors import ModelSpecError, UntrustedCodeError
from pipeline.registry import Registry
from pipeline.specs import int_list, positive_float, positive_int, probability, spec_options


class KDModel(nn.Module):
    """Normalisation + network. ``forward`` takes raw inputs (B, *sample_shape) and returns logits
    (B, C).
    """

    def __init__(
        self,
        spec: str,
        body: nn.Module,
        input_stats: tuple[float, float] = (0.0, 1.0),
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.register_buffer("input_mean", torch.tensor(float(input_stats[0])))
        self.register_buffer("input_std", torch.tensor(float(input_stats[1])))
        # Per-class offsets added to the logits after training (the paper's bias correction for
        # classes absent from the transfer set); zeros unless set, saved with the checkpoint.
        self.register_buffer("output_bias", torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.body, "token_inputs", False):
            # Token ids (B, P) -> (B, P, W): nothing to normalise, and no per-class bias (a
            # language model's head may be wider than its vocabulary).
            return self.body(x)
        x = (x.float() - self.input_mean) / self.input_std
        out = self.body(x)
        return out + self.output_bias if self.output_bias.numel() else out

    @torch.no_grad()
    def constrain(self) -> None:
        """Apply weight constraints after an optimiser step (max-norm for the paper's MLP)."""
        fn = getattr(self.body, "constrain", None)
        if fn is not None:
            fn()


class MLP(nn.Module):
    """ReLU MLP: flatten (B, *shape) → hidden layers → (B, C) logits."""

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        num_classes: int,
        input_dropout: float = 0.0,
        dropout: float = 0.0,
        max_norm: float | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.max_norm = max_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def constrain(self) -> None:
        if not self.max_norm:
            return
        # Max-norm on each hidden unit's incoming weight vector (rows of Linear.weight), as in
        # dropout training; the output layer is left free, as in the paper's teacher.
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for m in linears[:-1]:
            m.weight.copy_(torch.renorm(m.weight, p=2, dim=0, maxnorm=self.max_norm))


class SmallCNN(nn.Module):
    """Two conv blocks and an MLP head for (B, C_in, H, W) images."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int],
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if len(in_shape) != 3:
            raise ModelSpecError(
                f"cnn needs image inputs of shape (C, H, W); this dataset's samples are {in_shape}"
            )
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [
                nn.Conv2d(c, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ModelBuilder:
    """A registered model spec.

    Attributes:
        build: ``build(spec, parts, in_shape, num_classes) -> nn.Module`` (``parts``: the spec's
            ``:``-separated items after the name).
        flags: the teacher options (``--input-dropout``, ``--dropout``, ``--max-norm``) the
            model takes as spec options, each with the value it gets when neither the flag nor
            the spec sets it (None: the model's own default).
    """

    build: Callable[..., nn.Module]
    flags: Mapping[str, float | None] = field(default_factory=dict)


#: Model spec names -> :class:`ModelBuilder`. Sequence models (``gpt:``, ``hf:``) join from
#: ``pipeline.sequences.models`` (listed in :data:`pipeline.builtins.BUILTINS`); plug-ins from
#: the entry point group ``kd_pipeline.models`` (a module that calls :func:`register_model`).
MODELS: Registry[ModelBuilder] = Registry("models", "model", ModelSpecError, sort=True)


def register_model(
    name: str, help: str, flags: Mapping[str, float | None] | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """A decorator registering ``build(spec, parts, in_shape, num_classes) -> nn.Module`` in
    :data:`MODELS` as ``name``, with its one-line help and teacher ``flags``."""

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name, help, ModelBuilder(build, dict(flags or {})))
        return build

    return wrap


@register_model(
    "mlp",
    "mlp:H1,H2,...[:input_dropout=P][:dropout=P][:max_norm=X] ReLU MLP",
    # The paper's teacher: dropout 0.2 on the inputs and 0.5 on hidden units.
    {"input_dropout": 0.2, "dropout": 0.5, "max_norm": None},
)
def _build_mlp(
    spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    if not parts or "=" in parts[0]:
        raise ModelSpecError(f"model spec {spec!r}: mlp needs hidden widths, e.g. mlp:800,800")
    try:
        hidden = int_list(parts[0])
    except ValueError:
        raise ModelSpecError(
            f"model spec {spec!r}: hidden widths must be positive integers like 800,800"
        ) from None
    o = spec_options(
        spec,
        parts[1:],
        {"input_dropout": probability, "dropout": probability, "max_norm": positive_float},
    )
    return MLP(
        math.prod(in_shape),
        hidden,
        num_classes,
        o.get("input_dropout", 0.0),
        o.get("dropout", 0.0),
        o.get("max_norm"),
    )


@register_model(
    "cnn",
    "cnn[:channels=32,64][:hidden=128][:dropout=P] small conv net for images",
    {"dropout": None},
)
def _build_cnn(
    spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    o = spec_options(
        spec, parts, {"channels": int_list, "hidden": positive_int, "dropout": probability}
    )
    return SmallCNN(
        in_shape,
        num_classes,
        o.get("channels", [32, 64]),
        o.get("hidden", 128),
        o.get("dropout", 0.25),
    )


@register_model("torchscript", "torchscript:PATH a user's TorchScript module")
def _build_torchscript(
    spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    path = Path(":".join(parts))
    if not path.is_file():
        raise ModelSpecError(f"model spec {spec!r}: no TorchScript file at {path}")
    with warnings.catch_warnings():
        # torch deprecates TorchScript in favour of torch.export, but a user's .pt is TorchScript:
        # the warning on every load says nothing they can act on here.
        warnings.filterwarnings("ignore", message=r".*torch\.jit")  # Future- or Deprecation-
        return torch.jit.load(str(path), map_location="cpu")


@register_model("py", "py:package.module:factory a user's factory(in_shape=..., num_classes=...)")
def _build_py(
    spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    if len(parts) != 2:
        raise ModelSpecError(f"model spec {spec!r}: expected py:package.module:factory")
    try:
        factory = getattr(importlib.import_module(parts[0]), parts[1])
    except (ImportError, AttributeError) as e:
        raise ModelSpecError(
            f"model spec {spec!r}: cannot import {parts[0]}.{parts[1]} ({e})"
        ) from e
    except Exception as e:  # noqa: BLE001 - the module's own code ran on import
        raise ModelSpecError(
            f"model spec {spec!r}: importing module {parts[0]} raised {type(e).__name__}: {e}; "
            "fix that module"
        ) from e
    try:
        model = factory(in_shape=in_shape, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - a user's factory: anything may come out of it
        raise ModelSpecError(
            f"model spec {spec!r}: the factory {parts[0]}.{parts[1]}(in_shape={in_shape}, "
            f"num_classes={num_classes}) raised {type(e).__name__}: {e}; fix that factory (the "
            "error is in it, not in kd-pipeline)"
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return model


register_model("tv", "tv:NAME[:weights=FILE][:norm=imagenet|none] a torchvision architecture")(
    tv.build_tv
)
register_model(
    hf_image.PREFIX,
    "hf-image:DIR a transformers image classifier saved locally (pip install '.[hf]')",
)(hf_image.build_hf_image)


def code_source(spec: str) -> str | None:
    """What code besides this library a spec runs: the module of ``py:MODULE:FACTORY``, the file
    of ``torchscript:PATH``; None for the built-in models."""
    name, _, rest = spec.partition(":")
    if name == "py":
        return rest.split(":")[0]
    if name == "torchscript":
        return rest
    return None


def is_trusted(source: str, trust_code: Iterable[str]) -> bool:
    """Whether ``source`` (a module or a TorchScript file) is allowed by ``trust_code``: a module
    by its name or a package above it, a file by its path."""
    for t in trust_code:
        if source == t or source.startswith(t + "."):
            return True
        if Path(source).resolve() == Path(t).resolve():  # a TorchScript file, however spelled
            return True
    return False


def trusting(trust_code: Iterable[str], *explicit_specs: str | None) -> tuple[str, ...]:
    """``trust_code`` plus the code of specs the user typed (their own choice, so allowed)."""
    typed = [code_source(s) for s in explicit_specs if s]
    return (*trust_code, *(c for c in typed if c))


def check_trusted(spec: str, trust_code: Iterable[str], recorded_in: str) -> None:
    """Refuse a recorded spec whose code the user did not allow.

    Args:
        spec: the model spec read from a file.
        trust_code: the modules and TorchScript files the user allowed (``--trust-code``).
        recorded_in: the file it was read from, for the message.

    Raises:
        UntrustedCodeError: naming the module (or file) and the flag that allows it.
    """
    source = code_source(spec)
    if source is None or is_trusted(source, trust_code):
        return
    what = (
        f"import and run the Python module {source!r}"
        if spec.startswith("py:")
        else f"load and run the TorchScript program {source!r}"
    )
    raise UntrustedCodeError(
        f"{recorded_in} records the model spec {spec!r}, which would {what}; the file's author "
        "chose that code, and loading a checkpoint or cache runs no code you did not allow. "
        f"Nothing was imported. If you trust it, re-run with --trust-code {source}"
    )


def build_model(
    spec: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    input_stats: tuple[float, float] = (0.0, 1.0),
) -> KDModel:
    """Build a model from its spec.

    Args:
        spec: model spec, e.g. ``mlp:800,800:dropout=0.5``.
        in_shape: one sample's shape, e.g. (1, 28, 28).
        num_classes: number of output logits C.
        input_stats: (mean, std) of the raw inputs, stored in the model for normalisation.

    Returns:
        A ``KDModel`` mapping raw inputs (B, *in_shape) to logits (B, C).
    """
    name, _, rest = spec.partition(":")
    build = MODELS.get(name, where=f" in spec {spec!r}").build
    if num_classes < 1:
        raise ModelSpecError(f"model spec {spec!r}: num_classes must be >= 1, got {num_classes}")
    parts = rest.split(":") if rest else []
    body = build(spec, parts, tuple(in_shape), num_classes)
    return KDModel(spec, body, input_stats, num_classes)


def with_options(spec: str, **options: float | None) -> str:
    """Set ``key=value`` options on a model spec: a value replaces the spec's own; None leaves the
    spec as it is.
    """
    name, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    given = {k for k, v in options.items() if v is not None}
    keep = [p for p in parts if p.partition("=")[0] not in given or "=" not in p]
    extra = [f"{k}={v}" for k, v in options.items() if v is not None]
    return ":".join([name, *keep, *extra])
