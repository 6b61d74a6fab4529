"""Checkpoints that describe themselves and load without executing code.

A checkpoint is a ``torch.save`` of
``{"kd_checkpoint": VERSION, "meta": {...JSON...}, "state_dict": {...}}`` loaded back with
``weights_only=True`` (tensors and plain containers only: a checkpoint from someone else cannot run
code on load). Its recorded model spec is data too: a ``py:`` or ``torchscript:`` spec, whose code
its author chose, is built only when the caller allows that module or file (``trust_code``, the
``--trust-code`` option); otherwise loading stops before anything is imported.

``meta`` records the model spec, the input shape and classes, the training dataset's identity
(spec + fingerprint), the resolved config, and test metrics.

An ensemble is a directory of ``member-<i>.pt`` checkpoints (plus an ``ensemble.json`` summary).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline import hf_image
from pipeline.errors import CheckpointError, KDError
from pipeline.files import atomic_write
from pipeline.models import KDModel, build_model, check_trusted
from pipeline.redact import load_failure
from pipeline.sequences.hf import trusted_code
from pipeline.tv import teacher_meta as tv_teacher_meta

if TYPE_CHECKING:
    from pipeline.datasets import Dataset

CHECKPOINT_VERSION = 1


def file_sha256(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def save_checkpoint(path: str | Path, model: KDModel, meta: dict) -> Path:
    """Write ``model`` and its JSON ``meta`` to ``path`` atomically (temp file + rename).

    ``meta`` must hold at least ``model_spec``, ``in_shape``, ``num_classes``.
    """
    for key in ("model_spec", "in_shape", "num_classes"):
        if key not in meta:
            raise KDError(f"checkpoint meta is missing {key!r}")
    json.dumps(meta)  # fail here, not at load time, if meta is not JSON
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"kd_checkpoint": CHECKPOINT_VERSION, "meta": meta, "state_dict": state}
    # torch.save names the zip archive after the file's stem, ``<name>`` here (see atomic_path).
    return atomic_write(path, lambda tmp: _torch_save(blob, tmp))


def _torch_save(blob: dict, tmp: Path) -> None:
    """``torch.save(blob, tmp)``, with a failed write reported as the ``OSError`` it is.

    torch's zip writer reports a short write (a full disk) as a ``RuntimeError`` without an
    errno ("unexpected pos ..." / "file write failed"); it is re-raised as ``ENOSPC`` when the
    checkpoint needs more than the free space left, else as ``EIO``, so the one translation of
    storage errors (``pipeline.errors.explain``) says what happened.
    """
    try:
        torch.save(blob, tmp)
    except RuntimeError as e:
        if "unexpected pos" not in str(e) and "write" not in str(e).lower():
            raise
        needed = sum(t.numel() * t.element_size() for t in blob["state_dict"].values())
        code = errno.ENOSPC if shutil.disk_usage(tmp.parent).free < needed else errno.EIO
        raise OSError(code, os.strerror(code), str(tmp)) from e


@dataclass
class LoadedModel:
    """A model loaded from a checkpoint, with where it came from."""

    model: KDModel
    meta: dict
    path: Path
    sha256: str

    def identity(self) -> dict:
        """JSON identity of this model for cache and run metadata (with ``preprocess`` for a
        teacher whose input preprocessing is part of it: ``hf-image:``)."""
        out = {
            "path": str(self.path),
            "checkpoint_sha256": self.sha256,
            "model_spec": self.meta.get("model_spec"),
            "num_classes": self.meta.get("num_classes"),
            "train_dataset": (self.meta.get("dataset") or {}).get("spec"),
            "train_dataset_fingerprint": (self.meta.get("dataset") or {}).get("fingerprint"),
            "metrics": self.meta.get("metrics"),
        }
        if "preprocess" in self.meta:
            out["preprocess"] = self.meta["preprocess"]
        return out


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", trust_code: Sequence[str] = ()
) -> LoadedModel:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``); model in eval
    mode.

    Args:
        path: the checkpoint file.
        device: where the model goes.
        trust_code: modules (and packages) or TorchScript files a recorded ``py:`` or
            ``torchscript:`` spec may use; any other such spec is refused before it is imported.

    Raises:
        CheckpointError: missing, damaged or not a kd-pipeline checkpoint.
        UntrustedCodeError: its model spec names code the caller did not allow.
    """
    if is_model_spec(path):
        return _load_spec_teacher(str(path), device)
    if str(path).startswith("hf:"):
        return load_hf_model(str(path)[3:], device, trust_code)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe files
        raise CheckpointError(
            f"{path}: cannot load as a kd-pipeline checkpoint ({load_failure(e)}); "
            "is it damaged, or not written by kd-pipeline?"
        ) from e
    if not isinstance(blob, dict) or "kd_checkpoint" not in blob:
        raise CheckpointError(f"{path}: not a kd-pipeline checkpoint (no 'kd_checkpoint' key)")
    meta = blob.get("meta")
    if (
        not isinstance(blob["kd_checkpoint"], int)
        or not isinstance(meta, dict)
        or not isinstance(blob.get("state_dict"), dict)
        or any(k not in meta for k in ("model_spec", "in_shape", "num_classes"))
    ):
        raise CheckpointError(
            f"{path}: damaged kd-pipeline checkpoint: it needs an integer 'kd_checkpoint', a "
            "'state_dict' and 'meta' with model_spec, in_shape and num_classes"
        )
    if blob["kd_checkpoint"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {blob['kd_checkpoint']} is newer than this kd-pipeline "
            f"understands ({CHECKPOINT_VERSION}); upgrade kd-pipeline"
        )
    if not isinstance(meta["model_spec"], str):
        raise CheckpointError(f"{path}: damaged kd-pipeline checkpoint: model_spec is not a string")
    check_trusted(meta["model_spec"], trust_code, str(path))
    with trusted_code(trust_code):  # an hf:DIR spec with custom code: only a directory allowed
        model = build_model(meta["model_spec"], tuple(meta["in_shape"]), int(meta["num_classes"]))
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit model {meta['model_spec']!r}: {e}"
        ) from e
    model.to(device).eval()
    return LoadedModel(model, meta, path, file_sha256(path))


def is_model_spec(path: str | Path) -> bool:
    """Whether a teacher given where a checkpoint is expected is a ``tv:`` or ``hf-image:`` model
    spec."""
    return isinstance(path, str) and path.startswith(("tv:", f"{hf_image.PREFIX}:"))


def _load_spec_teacher(spec: str, device: torch.device | str) -> LoadedModel:
    """A teacher people already have: a ``tv:NAME:weights=FILE`` spec, built and loaded (its
    identity hashes the architecture, normalisation and the weights' bytes)."""
    hf = spec.startswith(f"{hf_image.PREFIX}:")
    full, meta, sha = (hf_image.teacher_meta if hf else tv_teacher_meta)(spec)
    model = build_model(full, (None, None, None), meta["num_classes"])
    model.to(device).eval()
    return LoadedModel(model, meta, Path(spec), sha)


def load_hf_model(
    directory: str, device: torch.device | str = "cpu", trust_code: Sequence[str] = ()
) -> LoadedModel:
    """A ``transformers`` causal LM saved in ``directory`` as a teacher (``hf:DIR``).

    Its custom code (``auto_map`` in ``config.json``) runs only when ``trust_code`` names the
    directory (``--trust-code DIR``).

    Its identity is a hash of the directory's files; its classes are the real vocabulary of the
    ``tokenizer.json`` beside it (the head may be wider: padded logits are dropped), else the
    model's ``vocab_size``.
    """
    from pipeline.sequences.tokenizers import JsonTokenizer  # optional: tokenizers

    root = Path(directory)
    with trusted_code(trust_code):
        model = build_model(f"hf:{directory}", (0,), 1)
    if not model.body.pretrained:  # type: ignore[union-attr]
        raise CheckpointError(
            f"hf:{directory} holds a config.json but no weights (model.safetensors or "
            "pytorch_model.bin): as a teacher or evaluated it would give random logits. Train "
            f"it first (kd-pipeline train-teacher --model hf:{directory}) and give the trained "
            "model"
        )
    meta: dict = {"model_spec": f"hf:{directory}", "in_shape": [], "sequence": True}
    width = int(model.body.width)  # type: ignore[union-attr]
    if (root / "tokenizer.json").is_file():
        tok = JsonTokenizer.load(root / "tokenizer.json")
        meta["tokenizer"] = tok.describe()
        meta["num_classes"] = tok.vocab_size
    else:
        meta["num_classes"] = width
    meta["output_width"] = width
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}:{file_sha256(f)};".encode())
    model.to(device).eval()
    return LoadedModel(model, meta, Path(f"hf:{directory}"), "sha256:" + h.hexdigest())


def member_paths(path: str | Path) -> list[Path | str]:
    """The checkpoint files behind ``path``: itself, or the ``*.pt`` members of an ensemble
    directory (a ``tv:`` model spec stays the spec; ``hf:DIR``: that model).
    """
    if is_model_spec(str(path)):
        return [str(path)]
    if str(path).startswith("hf:"):
        return [Path(str(path))]
    path = Path(path)
    if path.is_dir():
        members = sorted(path.glob("member-*.pt"), key=lambda p: (len(p.name), p.name)) or sorted(
            path.glob("*.pt")
        )
        if not members:
            raise CheckpointError(
                f"{path}: ensemble directory holds no *.pt checkpoints; train one with "
                "`kd-pipeline train-teacher --out DIR`"
            )
        return members
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or ensemble directory")
    return [path]


def fit_problems(models: list[LoadedModel], data: Dataset) -> list[str]:
    """Why these models cannot run together on ``data``: one line per model whose input shape
    differs from the samples', whose class count differs from the first model's, or (labeled data)
    from the dataset's. Empty if fine.
    """
    from pipeline.sequences.data import is_sequence
    from pipeline.sequences.models import teacher_problems

    if is_sequence(data):
        return teacher_problems(models, data)
    first = int(models[0].meta["num_classes"]) if models else 0
    return [
        f"{m.path} takes inputs {tuple(m.meta['in_shape'])} with {m.meta['num_classes']} classes, "
        f"but {data.spec} has samples {data.sample_shape}"
        + (f" with {data.num_classes} classes" if data.labeled else "")
        for m in models
        if not _shape_fits(m.meta["in_shape"], data.sample_shape)
        or int(m.meta["num_classes"]) != first
        or (data.labeled and int(m.meta["num_classes"]) != data.num_classes)
    ]


def _shape_fits(in_shape: list, sample_shape: tuple[int, ...]) -> bool:
    """A model's recorded input shape against the samples' (None: any size there)."""
    return len(in_shape) == len(sample_shape) and all(
        a is None or a == b for a, b in zip(in_shape, sample_shape, strict=True)
    )


def load_models(
    paths: list[str | Path], device: torch.device | str = "cpu", trust_code: Sequence[str] = ()
) -> list[LoadedModel]:
    """Load every member behind each path (checkpoint or ensemble directory), in order
    (``trust_code`` as for :func:`load_checkpoint`)."""
    return [load_checkpoint(p, device, trust_code) for path in paths for p in member_paths(path)]
