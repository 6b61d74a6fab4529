"""Tiny Hugging Face image classifiers saved locally (seeded random weights and their image
processors), for the ``hf-image:`` tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.images import CLASSES
from tests.helpers.optional import require

LABELS = {i: name for i, name in enumerate(CLASSES)}
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def save_vit(out: Path, side: int = 16) -> Path:
    """A seeded random 1-layer ViT for side x side images and its (Pillow) image processor."""
    tf = require("transformers")
    torch.manual_seed(0)
    config = tf.ViTConfig(
        image_size=side,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    tf.ViTForImageClassification(config).save_pretrained(out)
    processor = tf.ViTImageProcessorPil(
        size={"height": side, "width": side}, image_mean=MEAN, image_std=STD
    )
    processor.save_pretrained(out)
    return out


def save_resnet(out: Path, side: int = 16) -> Path:
    """A seeded random 1-stage ResNet and a ConvNeXt-style processor (shortest edge, crop_pct)."""
    tf = require("transformers")
    torch.manual_seed(1)
    config = tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[16], depths=[1], id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    tf.ResNetForImageClassification(config).save_pretrained(out)
    tf.ConvNextImageProcessorPil(
        size={"shortest_edge": side}, crop_pct=0.8, image_mean=MEAN, image_std=STD
    ).save_pretrained(out)
    return out
