"""``kd-pipeline demo``: the main job on the shipped Fashion-MNIST, through the public stages only."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import CacheConfig, EvaluateConfig, TeacherConfig
from pipeline.training import TrainConfig
from stages import cache_logits, evaluate, train_teacher


@dataclass
class DemoConfig:
    out: str
    epochs: int = 3
    members: int = 2
    model: str = "mlp:1200,1200"
    train_subset: float | None = None
    device: str = "auto"
    seed: int = 0


def run(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Teacher ensemble -> evaluation -> logit cache. Re-running reuses what exists."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_spec = "fashion-mnist:train" + (f":fraction={cfg.train_subset}:seed={cfg.seed}" if cfg.train_subset else "")
    teacher_dir = out / "teacher"
    if not (teacher_dir / "ensemble.json").is_file():
        train_teacher.run(TeacherConfig(dataset=train_spec, model=cfg.model, members=cfg.members, out=str(teacher_dir),
                                        device=cfg.device, train=TrainConfig(epochs=cfg.epochs, seed=cfg.seed)),
                          log=log)
    else:
        log(f"reusing the teacher in {teacher_dir}")
    res = evaluate.run(EvaluateConfig(model=str(teacher_dir), dataset="fashion-mnist:test", device=cfg.device))
    cache = out / "cache.zarr"
    cres = cache_logits.run(CacheConfig(teachers=[str(teacher_dir)], dataset=train_spec, out=str(cache),
                                        device=cfg.device, command="kd-pipeline demo"), log=log, progress=False)
    log(cres.message)
    summary = {"config": asdict(cfg), "teacher": res, "cache": str(cache)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    log("")
    log(f"{'model':<24} {'test errors':>11} {'accuracy':>9} {'ECE':>7}")
    for i, m in enumerate(res["members"]):
        log(f"{f'teacher member {i}':<24} {m['errors']:>11} {m['accuracy']:>9.4f} {m['ece']:>7.4f}")
    e = res["ensemble"]
    log(f"{'teacher ensemble':<24} {e['errors']:>11} {e['accuracy']:>9.4f} {e['ece']:>7.4f}")
    log(f"\nteacher: {teacher_dir}\ncache:   {cache}\nsummary: {out / 'demo.json'}")
    return summary
