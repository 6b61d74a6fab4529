"""Choosing where tensors live. Nothing else in the project names a device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.errors import KDError
from pipeline.registry import Registry

#: ``--device`` kinds -> ``make(name) -> torch.device`` (``name`` as given: ``cuda:1`` keeps
#: its index). Asking for an accelerator that is not there is an error rather than a silent
#: fallback, so a run never records a device it did not use.
DEVICES: Registry[Callable[[str], torch.device]] = Registry("devices", "device", KDError)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@DEVICES.register("auto", "CUDA when present, else MPS, else the CPU")
def _auto(name: str) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


@DEVICES.register("cpu", "the CPU")
def _cpu(name: str) -> torch.device:
    return torch.device("cpu")


@DEVICES.register("cuda", "cuda or cuda:N, an NVIDIA GPU")
def _cuda(name: str) -> torch.device:
    if not torch.cuda.is_available():
        raise KDError(
            f"--device {name} was asked for but torch sees no CUDA device; use --device cpu or auto"
        )
    return torch.device(name)


@DEVICES.register("mps", "Apple's Metal GPU")
def _mps(name: str) -> torch.device:
    if not _mps_available():
        raise KDError(
            "--device mps was asked for but MPS is not available; use --device cpu or auto"
        )
    return torch.device("mps")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device`` (see :data:`DEVICES`)."""
    name = (name or "auto").lower()
    kind = "cuda" if name.startswith("cuda") else name
    return DEVICES.get(kind)(name)


def describe_device(device: torch.device) -> str:
    """A human-readable name of ``device`` for metadata (GPU model on CUDA)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
