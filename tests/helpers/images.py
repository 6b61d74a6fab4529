"""Image folders, Hugging Face datasets and torchvision weights made in code for the lazy-source
tests (nothing is committed or downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "stripes")


def class_image(c: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A (size, size, 3) uint8 image of class ``c``: a seeded noisy pattern a small net can tell
    apart (a bright disc, a bright square, vertical stripes) in a class colour."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    if c == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
    elif c == 1:
        mask = (abs(yy - cy) < size // 5) & (abs(xx - cx) < size // 5)
    else:
        mask = (xx // 3) % 2 == 0
    img = rng.integers(0, 80, (size, size, 3))
    img[mask] += np.array([120, 60, 30])[np.roll(np.arange(3), c)] + 50
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path, per_class: dict[str, int], seed: int = 0, size: int = 32, ext: str = "png"
) -> Path:
    """``root/SPLIT/CLASS/NNNNN.png`` for each split's count per class; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(class_image(c, rng, size)).save(d / f"{i:05d}.{ext}")
    return root


def tv_weights(path: Path, arch: str = "resnet18", classes: int = 3, seed: int = 0) -> Path:
    """A torchvision architecture with seeded random weights, saved as a plain state dict."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    torch.save(
        torchvision.models.get_model(arch, weights=None, num_classes=classes).state_dict(), path
    )
    return path
