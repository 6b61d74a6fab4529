"""The cache writer's tests' tools: ``build_cache`` with their shard and batch sizes, teachers
trained for them, and what a cache stored, read back raw (beside the teacher's own outputs)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import zarr

from pipeline.cache.header import ATTR_KEY

# torch and the writer are imported where they are used: tests/conftest.py imports this module,
# and a test session must not import torch before a test asks for it.

RPS = 64  # rows per shard: 600 rows -> 10 shards (the last one short)
BATCH = 64


def spec_of(npz: Path, *mods: str) -> str:
    return ":".join([f"npz:{npz}:train", *mods])


def members_of(teacher_dir: Path) -> list[Path]:
    return [teacher_dir / "member-0.pt", teacher_dir / "member-1.pt"]


def make(out: Path, teachers: list, dataset: str, **kw: object):  # noqa: ANN201
    """build_cache with quiet logging, the test's shard size and batch size unless overridden."""
    from pipeline.cache.config import CacheConfig
    from pipeline.cache.writer import build_cache

    kw.setdefault("rows_per_shard", RPS)
    kw.setdefault("batch_size", BATCH)
    cfg = CacheConfig(
        teachers=[str(t) for t in teachers],
        dataset=dataset,
        out=str(out),
        device="cpu",
        command="pytest make",
        **kw,
    )
    return build_cache(cfg, log=lambda s: None, progress=False)


def snapshot(root: Path, under: str = "") -> dict[str, tuple[str, int]]:
    """{relative path: (sha256 of bytes, mtime_ns)} of every file under ``root/under``."""
    base = root / under if under else root
    return {
        str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
        for f in sorted(base.rglob("*"))
        if f.is_file()
    }


def raw_group(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r", use_consolidated=False)


def stored_logits(path: Path, member: int) -> np.ndarray:
    return raw_group(path)[f"members/{member}/logits"][:]


def model_outputs(checkpoint: Path, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """The teacher's own float32 logits: load_checkpoint + model(x), in batches of ``batch``
    rows."""
    import torch

    from pipeline.checkpoints import load_checkpoint

    model = load_checkpoint(checkpoint).model
    with torch.inference_mode():
        return (
            torch.cat(
                [
                    model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])))
                    for i in range(0, len(x), batch)
                ]
            )
            .float()
            .numpy()
        )


def train(out: Path, npz: Path, model: str, seed: int, members: int = 1, epochs: int = 2) -> Path:
    """A ``model`` teacher of ``members`` members trained on ``npz:NPZ:train`` (no dropout, no
    jitter, no eval set), seeded."""
    from pipeline.training.config import TeacherConfig
    from pipeline.training.teacher import train_teacher
    from pipeline.training.train_config import TrainConfig

    train_teacher(
        TeacherConfig(
            dataset=spec_of(npz),
            model=model,
            input_dropout=0.0,
            dropout=0.0,
            jitter=0,
            members=members,
            eval=None,
            out=str(out),
            device="cpu",
            train=TrainConfig(epochs=epochs, batch_size=64, seed=seed),
        ),
        log=lambda s: None,
    )
    return out


def set_complete_flag(path: Path, value: bool) -> None:
    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    h = dict(g.attrs[ATTR_KEY])
    h["complete"] = value
    g.attrs[ATTR_KEY] = h


def ids_in(message: str) -> list[int]:
    """The sample ids an error message lists: '... sample ids [3, 7, ...] (12 in all)'."""
    m = re.search(r"sample ids \[([0-9, .]*)\] \((\d+) in all\)", message)
    assert m, message
    return [int(v) for v in m.group(1).replace("...", "").split(",") if v.strip()]
