"""``kd-pipeline sweep``: a grid of students trained from one cache, as dask tasks (see ``pipeline.sweep``)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import SweepConfig
from pipeline.sweep import SweepResult, plan_text, run_sweep


def run(cfg: SweepConfig, log: Callable[[str], None] = print, progress: bool = True,
        dry_run: bool = False) -> SweepResult | None:
    """Print the grid and its cost (``dry_run``), or run / resume the sweep and print its table."""
    if dry_run:
        log(plan_text(cfg)[1])
        return None
    res = run_sweep(cfg, log=log, progress=progress)
    log("")
    log(res.table)
    log(f"\n{len(res.rows)} settings: {res.trained} trained, {res.reused} reused, {res.failed} failed"
        + (", interrupted" if res.interrupted else "") + f" in {res.seconds:.1f}s")
    log(f"results: {res.files.get('csv')}, {res.files.get('json')}, {cfg.out}/results.md"
        + (f"\nplot:    {res.files['plot']}" if "plot" in res.files else ""))
    return res
