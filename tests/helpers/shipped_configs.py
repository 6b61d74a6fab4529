"""The run files in ``configs/``: each one's command and the config it must hold, built from the
code that runs it (the demo's own ``DemoConfig`` steps, ``ReproduceConfig`` at each scale), so a
file cannot drift from what the demo or ``reproduce`` runs.

``python -m tests.helpers.shipped_configs`` (re)writes the files from this table;
``tests/stages/test_run_files.py`` checks them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.cache.config import CacheConfig
from pipeline.experiments.demo import DemoConfig
from pipeline.experiments.reproduce import ReproduceConfig
from pipeline.runfile import run_toml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def _demo() -> dict[str, tuple[list[str], str, Any]]:
    demo = DemoConfig(out="data/demo")
    transfer = demo.specs()[1]
    cache = "data/demo/cache.zarr"

    def student(name: str, temperature: float, alpha: float) -> Any:
        # The demo owns its run directories (overwrite); a replay reuses a finished run instead.
        run = demo.student_config(cache, f"data/demo/runs/{name}", temperature, alpha)
        return replace(run, overwrite=False)

    files = {
        "demo/demo.toml": (["demo"], "the whole demo: teacher, cache, baseline, students", demo),
        "demo/teacher.toml": (["train-teacher"], "the demo's teacher", demo.teacher_config()),
        "demo/cache.toml": (
            ["cache-logits"],
            "the demo's logit cache over its transfer set",
            CacheConfig(
                teachers=[demo.teacher_config().out],
                dataset=transfer,
                out=cache,
                device=demo.device,
            ),
        ),
        "demo/baseline.toml": (
            ["train-student"],
            "the demo's baseline: the transfer set's hard labels only",
            student("baseline", 1.0, 0.0),
        ),
    }
    for t in demo.temperatures:
        files[f"demo/student-T{t:g}.toml"] = (
            ["train-student"],
            f"the demo's distilled student at T = {t:g}",
            student(f"T{t:g}", t, demo.alpha),
        )
    return files


def _paper() -> dict[str, tuple[list[str], str, Any]]:
    runs = {
        "fashion-mnist-quick": ("fashion-mnist", "quick", "a smoke test of every recipe"),
        "fashion-mnist-full": ("fashion-mnist", "full", "the paper's four experiments"),
        "mnist-full": ("mnist", "full", "the paper's four experiments on the paper's MNIST"),
    }
    return {
        f"paper/reproduce-{name}.toml": (
            ["reproduce"],
            why,
            ReproduceConfig(dataset=dataset, scale=scale, out=f"data/reproduce/{name}"),
        )
        for name, (dataset, scale, why) in runs.items()
    }


def shipped() -> dict[str, tuple[list[str], Any]]:
    """``configs/`` file -> (its command, the config it holds)."""
    return {path: (command, cfg) for path, (command, _, cfg) in {**_demo(), **_paper()}.items()}


def text(path: str) -> str:
    """The file's text: a comment saying how to run it, then the config as ``--print-config``
    writes it."""
    command, why, cfg = {**_demo(), **_paper()}[path]
    head = f"# {why}\n# kd-pipeline {' '.join(command)} --config configs/{path}\n\n"
    return head + run_toml(cfg)


if __name__ == "__main__":
    for name in shipped():
        target = CONFIGS / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text(name))
        print(f"wrote {target}")
