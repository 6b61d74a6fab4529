"""torchvision architectures as teachers and students: ``tv:NAME[:weights=FILE][:norm=...]``.

``tv:resnet18:weights=resnet18.pth`` builds ``torchvision.models.resnet18`` (weights=None: nothing
is ever downloaded) and loads a local file: a plain state dict, or a torchvision reference-script
checkpoint (``{"model": state_dict, ...}``; a DistributedDataParallel ``module.`` prefix is
removed), with ``torch.load(weights_only=True)``. The class count is the file's (its last layer's)
unless ``classes=N`` says it.

Input normalisation is part of the network and recorded in the spec: ``norm=imagenet`` (the default
when weights are given: torchvision's pretrained weights expect it) divides raw 0..255 pixels by 255
and standardises each channel with ImageNet's mean and std; ``norm=none`` (the default without
weights, e.g. a student) leaves it to the model's own input statistics. Grey images (1 channel)
are repeated to the 3 channels torchvision's stems take.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelSpecError
from pipeline.redact import load_failure

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = ("imagenet", "none")
OPTIONS = ("weights", "norm", "classes")


# How to get a torchvision that loads: PyPI's default wheels are CUDA builds, which do not load
# next to a CPU-only torch (their ops are compiled against another torch build).
def matching_torchvision(torch_version: str | None = None) -> str:
    """How to install the torchvision release made for this torch (torchvision 0.(m + 15) goes
    with torch 2.m: 0.28 with 2.13, 0.29 with 2.14), from the index of this torch's build."""
    v = (torch_version or torch.__version__).split("+")
    major, minor = (int(p) for p in v[0].split(".")[:2])
    local = v[1] if len(v) > 1 else ""
    pin = f"torchvision==0.{minor + 15}.*" if major == 2 else "torchvision"
    index = (
        f" --index-url https://download.pytorch.org/whl/{local}"
        if local.startswith(("cpu", "cu", "rocm"))
        else ""
    )
    return (
        f"install the torchvision release that matches your torch: pip install '{pin}'{index}, "
        "or pip uninstall torchvision if you do not need tv: models or folder images"
    )




def torchvision_problem() -> str | None:
    """Why the installed torchvision does not load next to this torch, or None (it loads, or it
    is not installed). ``transformers`` imports torchvision when it is present, so a mismatched
    one breaks ``hf:`` models too, with an error that never names it."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a build for another torch fails while loading its ops
        from importlib.metadata import PackageNotFoundError, version

        try:
            have = version("torchvision")
        except PackageNotFoundError:
            have = "?"
        return (
            f"the installed torchvision {have} does not load with torch {torch.__version__} "
            f"({type(e).__name__}: {str(e)[:120]}); {matching_torchvision()}"
        )
    return None


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise ModelSpecError(
            "tv: models need torchvision, which is not installed: pip install "
            "'kd-pipeline[vision]' (the torchvision release that matches your torch)"
        ) from None
    except Exception as e:  # noqa: BLE001 - a build for another torch fails while loading its ops
        raise ModelSpecError(
            f"tv: models need torchvision, but the installed one does not load with torch "
            f"{torch.__version__} ({type(e).__name__}: {str(e)[:120]}): {matching_torchvision()}"
        ) from None
    return torchvision


class TVNet(nn.Module):
    """A torchvision network behind its recorded input normalisation.

    ``forward``: (B, C, H, W) float inputs (raw pixel values 0..255 with ``norm=imagenet``) ->
    (B, classes) logits.
    """

    def __init__(self, net: nn.Module, norm: str) -> None:
        super().__init__()
        self.net, self.norm = net, norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.norm == "imagenet":
            x = (x - self.mean) / self.std
        return self.net(x)


def parse(spec: str, parts: list[str]) -> tuple[str, dict[str, str]]:
    """``tv:NAME[:k=v...]`` -> (NAME, options), checked."""
    if not parts or "=" in parts[0]:
        raise ModelSpecError(f"model spec {spec!r}: expected tv:NAME, e.g. tv:resnet18")
    opts: dict[str, str] = {}
    for item in parts[1:]:
        key, eq, value = item.partition("=")
        if not eq or key not in OPTIONS:
            raise ModelSpecError(
                f"model spec {spec!r}: unknown option {item!r}; expected key=value with key in "
                f"{', '.join(OPTIONS)}"
            )
        opts[key] = value
    if opts.get("norm", "imagenet") not in NORMS:
        raise ModelSpecError(f"model spec {spec!r}: norm= expects imagenet or none")
    if "classes" in opts and (not opts["classes"].isdigit() or int(opts["classes"]) < 1):
        raise ModelSpecError(f"model spec {spec!r}: classes= expects a positive integer")
    return parts[0], opts


def read_weights(spec: str, file: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file (plain, or a torchvision checkpoint's ``model``)."""
    path = Path(file)
    if not path.is_file():
        raise ModelSpecError(f"model spec {spec!r}: no weights file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe files
        raise ModelSpecError(
            f"model spec {spec!r}: {path} does not load as plain tensors ({load_failure(e)}); "
            "save a state dict: torch.save(model.state_dict(), FILE)"
        ) from e
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ModelSpecError(f"model spec {spec!r}: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def weights_classes(state: dict[str, torch.Tensor]) -> int:
    """The class count of a classifier's state dict: its last 1-d tensor (the output bias)."""
    for v in reversed(list(state.values())):
        if v.ndim == 1:
            return int(v.shape[0])
    raise ModelSpecError("cannot tell the class count from the weights; give classes=N")


def build_tv(spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model registry's builder for ``tv:`` specs (see the module docstring)."""
    name, opts = parse(spec, parts)
    tv = _torchvision()
    try:
        builder = tv.models.get_model_builder(name)
    except ValueError:
        known = ", ".join(sorted(tv.models.list_models(module=tv.models))[:12])
        raise ModelSpecError(
            f"model spec {spec!r}: torchvision has no classification model {name!r} "
            f"(e.g. {known}, ...)"
        ) from None
    if len(in_shape) != 3 or in_shape[0] not in (1, 3, None):
        raise ModelSpecError(
            f"model spec {spec!r}: torchvision models take images (1 or 3, H, W); "
            f"the samples are {in_shape}"
        )
    net = builder(weights=None, num_classes=num_classes)
    if "weights" in opts:
        try:
            net.load_state_dict(read_weights(spec, opts["weights"]))
        except RuntimeError as e:
            raise ModelSpecError(
                f"model spec {spec!r}: the weights do not fit {name} with {num_classes} "
                f"classes: {str(e).splitlines()[0]}"
            ) from e
    return TVNet(net, opts.get("norm", "imagenet" if "weights" in opts else "none"))


def teacher_meta(spec: str) -> tuple[str, dict, str]:
    """A teacher given as a ``tv:`` spec: (its spec with the normalisation spelled out, checkpoint
    meta, sha256 identity over the architecture, normalisation and the weights' bytes)."""
    name, _, rest = spec.partition(":")
    arch, opts = parse(spec, rest.split(":") if rest else [])
    state = read_weights(spec, opts["weights"]) if "weights" in opts else None
    classes = int(opts["classes"]) if "classes" in opts else None
    if classes is None:
        if state is None:
            raise ModelSpecError(f"model spec {spec!r}: give weights=FILE or classes=N")
        classes = weights_classes(state)
    norm = opts.get("norm", "imagenet" if state is not None else "none")
    full = ":".join(
        ["tv", arch, *[f"{k}={opts[k]}" for k in ("weights",) if k in opts], f"norm={norm}"]
    )
    h = hashlib.sha256(f"tv:{arch}:norm={norm}:classes={classes};".encode())
    if "weights" in opts:
        with open(opts["weights"], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    meta = {
        "model_spec": full,
        "in_shape": [None, None, None],  # any image (1 or 3 channels, any size) it takes
        "num_classes": classes,
        "class_names": None,
        "input_normalisation": {
            "norm": norm,
            "scale": 255.0 if norm == "imagenet" else None,
            "mean": list(IMAGENET_MEAN) if norm == "imagenet" else None,
            "std": list(IMAGENET_STD) if norm == "imagenet" else None,
        },
        "weights": opts.get("weights"),
    }
    return full, meta, "sha256:" + h.hexdigest()
