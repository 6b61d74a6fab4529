"""Hugging Face image classifiers as teachers: ``hf-image:DIR``.

``DIR`` is a directory written by ``save_pretrained`` of a ``transformers`` image classifier
(ViT, ResNet, ConvNeXt, ... anything ``AutoModelForImageClassification`` loads) and of its image
processor (``preprocessor_config.json``). It is loaded offline (``local_files_only=True``) and
never runs the directory's own code (``trust_remote_code=False``).

The processor's preprocessing becomes part of the network, so the teacher takes the raw pixels a
``folder:`` or ``hf:`` image dataset holds ((B, C, H, W), values 0..255), as every kd-pipeline
model does, and the cache records it (its member's ``preprocess``)::

    resize      to size (height x width), or the shorter side to shortest_edge (ConvNeXt's
                crop_pct: to shortest_edge / crop_pct, then a centre crop) - only when the
                input is not that size already
    centre crop to crop_size (do_center_crop)
    rescale     x * rescale_factor (1/255: pixels to 0..1)
    normalise   (x - image_mean) / image_std, per channel

Resizing here is torch's (``interpolate``, antialiased), which is close to but not bit-equal with
the processor's Pillow resize: for bit-equal inputs let the dataset resize with Pillow
(``folder:DIR:SPLIT:size=S``, bilinear, as the processor's Pillow backend does) so that the
images arrive at the model's size. Grey images are repeated to the 3 channels a model wants.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ModelSpecError
from pipeline.progress import transformers_bars_on_terminal_only

PREFIX = "hf-image"
# Pillow's resample codes, as processors record them, and the torch mode that stands for each.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos", 4: "box", 5: "hamming"}
TORCH_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic"}
# Processor switches this module applies (any other ``do_*`` set true is refused).
APPLIED = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")


@dataclass(frozen=True)
class ImagePreprocess:
    """An image processor's steps, as :class:`HFImageClassifier` applies them.

    Attributes:
        size: (H, W) to resize to, or None.
        shortest_edge: resize the shorter side to this (aspect kept), or None.
        crop: (H, W) of the centre crop after resizing, or None.
        resample: ``bilinear``, ``bicubic``, ``nearest`` (others are recorded, and refused when
            an input needs resizing).
        rescale: the factor pixels are multiplied by, or None.
        mean, std: per-channel normalisation, or None.
        processor: the processor's class name, as recorded.
    """

    size: tuple[int, int] | None
    shortest_edge: int | None
    crop: tuple[int, int] | None
    resample: str
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    processor: str | None

    def record(self) -> dict:
        """What the cache's member records (``preprocess``)."""
        out = asdict(self)
        out["resize_with"] = "torch.nn.functional.interpolate(antialias=True), when needed"
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The (H, W) the resize step gives an (h, w) image (the processor's arithmetic)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return h, w
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if h <= w else (new_long, self.shortest_edge)


def _hw(spec: str, value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ModelSpecError(
        f"{spec}: the image processor's {what} is {value!r}; expected {{height, width}}"
    )


def read_preprocess(spec: str, directory: Path) -> ImagePreprocess:
    """The preprocessing ``DIR/preprocessor_config.json`` describes.

    Raises:
        ModelSpecError: no processor config, or a step this module does not apply.
    """
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise ModelSpecError(
            f"{spec}: no preprocessor_config.json in {directory}; save the model's image "
            "processor there too (processor.save_pretrained(DIR)): it says how images are "
            "resized and normalised"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{spec}: {path} is not readable JSON ({e})") from e
    unknown = sorted(k for k, v in cfg.items() if k.startswith("do_") and v and k not in APPLIED)
    if unknown:
        raise ModelSpecError(
            f"{spec}: the image processor sets {', '.join(unknown)}, which hf-image teachers do "
            f"not apply (they apply {', '.join(APPLIED)}); cache this teacher's logits with your "
            "own code, or save a processor without them"
        )
    size = shortest = crop = None
    if cfg.get("do_resize", False):
        raw = cfg.get("size")
        if isinstance(raw, dict) and "shortest_edge" in raw:
            shortest = int(raw["shortest_edge"])
            crop_pct = cfg.get("crop_pct")
            if crop_pct is not None and shortest < 384:  # ConvNeXt: resize, then centre crop
                crop = (shortest, shortest)
                shortest = int(shortest / float(crop_pct))
        else:
            size = _hw(spec, raw, "size")
    if cfg.get("do_center_crop", False):
        crop = _hw(spec, cfg.get("crop_size"), "crop_size")
    code = cfg.get("resample", 2)
    resample = RESAMPLE.get(code, str(code)) if isinstance(code, int) else str(code)

    def floats(key: str) -> tuple[float, ...] | None:
        v = cfg.get(key)
        if v is None:
            return None
        return tuple(float(a) for a in (v if isinstance(v, list) else [v]))

    normalise = bool(cfg.get("do_normalize", False))
    return ImagePreprocess(
        size=size,
        shortest_edge=shortest,
        crop=crop,
        resample=resample,
        rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale") else None,
        mean=floats("image_mean") if normalise else None,
        std=floats("image_std") if normalise else None,
        processor=cfg.get("image_processor_type"),
    )


def _load(spec: str, directory: Path) -> nn.Module:
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise ModelSpecError(
            f"{spec} needs the `transformers` package: pip install 'kd-pipeline[hf]'"
        ) from None
    if not (directory / "config.json").is_file():
        raise ModelSpecError(
            f"{spec}: no config.json in {directory}; give a directory written by a transformers "
            "image classifier's save_pretrained (nothing is downloaded)"
        )
    try:
        with transformers_bars_on_terminal_only():
            return AutoModelForImageClassification.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        auto_map = _auto_map(directory)
        if auto_map:
            # transformers' own message asks for trust_remote_code=True, which no option of
            # kd-pipeline passes for image classifiers: say what is wrong in our terms.
            raise ModelSpecError(
                f"{spec}: its config.json names custom modelling code (auto_map: {auto_map}) "
                "for an architecture transformers does not ship; hf-image: teachers never run "
                "a directory's own code (--trust-code does not apply to them), and nothing was "
                "imported. Give a model of an architecture transformers ships (ViT, ResNet, "
                "ConvNeXt, ...), or export yours as torchscript:PATH"
            ) from None
        raise ModelSpecError(f"{spec}: cannot load it as an image classifier ({e})") from e


def _auto_map(directory: Path) -> str:
    """The custom classes ``directory``'s config.json names (``auto_map``), or ``""``."""
    try:
        auto_map = json.loads((directory / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(auto_map, dict):
        return ", ".join(sorted(map(str, auto_map.values())))
    return str(auto_map) if auto_map else ""


class HFImageClassifier(nn.Module):
    """A ``transformers`` image classifier behind its processor's preprocessing.

    ``forward``: (B, C, H, W) raw pixels (0..255) -> (B, num_labels) logits.
    """

    def __init__(self, spec: str, directory: Path) -> None:
        super().__init__()
        self.spec = spec
        self.prep = read_preprocess(spec, directory)
        self.net = _load(spec, directory)
        self.channels = int(getattr(self.net.config, "num_channels", 3))
        for name, v in (("mean", self.prep.mean), ("std", self.prep.std)):
            t = torch.tensor(v if v is not None else [0.0 if name == "mean" else 1.0])
            self.register_buffer(name, t.view(1, -1, 1, 1), persistent=False)

    @property
    def num_labels(self) -> int:
        return int(self.net.config.num_labels)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw pixels -> the model's ``pixel_values`` (the steps above, in order)."""
        p = self.prep
        x = x.float()
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        target = p.output_size(h, w)
        if target != (h, w):
            mode = TORCH_MODES.get(p.resample)
            if mode is None:
                raise ModelSpecError(
                    f"{self.spec}: images of {h}x{w} need resizing to {target[0]}x{target[1]} "
                    f"with {p.resample}, which hf-image teachers do not do; resize them in the "
                    f"dataset (folder:DIR:SPLIT:size={min(target)})"
                )
            x = F.interpolate(
                x, size=target, mode=mode, antialias=mode != "nearest", align_corners=None
            )
        if p.crop is not None:
            ch, cw = p.crop
            top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
            if top < 0 or left < 0:
                raise ModelSpecError(
                    f"{self.spec}: images of {x.shape[-2]}x{x.shape[-1]} are smaller than the "
                    f"processor's crop {ch}x{cw}"
                )
            x = x[..., top : top + ch, left : left + cw]
        if p.rescale is not None:
            x = x * p.rescale
        if p.mean is not None and p.std is not None:
            x = (x - self.mean) / self.std
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=self.preprocess(x)).logits


def _directory(spec: str, parts: list[str]) -> Path:
    if len(parts) != 1 or not parts[0]:
        raise ModelSpecError(f"model spec {spec!r}: expected {PREFIX}:DIR")
    if not Path(parts[0]).is_dir():
        raise ModelSpecError(
            f"{spec}: no such directory; give one written by a transformers image classifier's "
            "save_pretrained and its image processor's (nothing is downloaded)"
        )
    return Path(parts[0])


def build_hf_image(
    spec: str, parts: list[str], in_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """The model registry's builder for ``hf-image:DIR`` (a teacher, or a student to fine-tune).

    Raises:
        ModelSpecError: not loadable, or its labels are not ``num_classes``.
    """
    model = HFImageClassifier(spec, _directory(spec, parts))
    if model.num_labels != num_classes:
        raise ModelSpecError(
            f"{spec}: the model has {model.num_labels} labels, {num_classes} are wanted"
        )
    if len(in_shape) != 3 or in_shape[0] not in (1, model.channels, None):
        raise ModelSpecError(
            f"{spec}: the model takes images ({model.channels}, H, W); the samples are {in_shape}"
        )
    return model


def teacher_meta(spec: str) -> tuple[str, dict, str]:
    """A teacher given as ``hf-image:DIR``: (its spec, checkpoint meta with the preprocessing,
    a sha256 identity over the directory's files)."""
    name, _, rest = spec.partition(":")
    directory = _directory(spec, rest.split(":") if rest else [])
    prep = read_preprocess(spec, directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"{spec}: no readable config.json in {directory} ({e})") from e
    labels = config.get("id2label") or {}
    classes = len(labels) or int(config.get("num_labels", 0))
    if classes < 1:
        raise ModelSpecError(f"{spec}: config.json says nothing about the model's labels")
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(directory)}:".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b";")
    meta = {
        "model_spec": spec,
        "in_shape": [None, None, None],  # any image: resized by the preprocessing
        "num_classes": classes,
        "class_names": [str(labels.get(str(i), i)) for i in range(classes)] if labels else None,
        "preprocess": prep.record(),
    }
    return spec, meta, "sha256:" + h.hexdigest()
