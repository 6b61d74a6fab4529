"""Choosing where tensors live. Nothing else in the project names a device."""

from __future__ import annotations

import torch

from pipeline.errors import KDError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device``.

    ``auto`` picks CUDA when present, then MPS, else the CPU. Asking for an accelerator that is not
    there is an error rather than a silent fallback, so a run never records a device it did not use.
    """
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KDError(
                f"--device {name} was asked for but torch sees no CUDA device; "
                "use --device cpu or auto"
            )
        return torch.device(name)
    if name == "mps":
        if not (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        ):
            raise KDError(
                "--device mps was asked for but MPS is not available; use --device cpu or auto"
            )
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise KDError(
        f"unknown device {name!r}; expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N)"
    )


def describe_device(device: torch.device) -> str:
    """A human-readable name of ``device`` for metadata (GPU model on CUDA)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
