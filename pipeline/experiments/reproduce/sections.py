"""What the paper's experiments are measured into: a plain record of numbers, and a verdict on them.

An experiment (``EXPERIMENTS`` in :mod:`pipeline.experiments.reproduce`; each in its own module:
``main_table``, ``temperature``, ``omitted_class``, ``small_data``, ``consistency``) takes the
shared :class:`~.artefacts.Run`, makes or reuses the artefacts it needs, and returns a
:class:`Section` subclass holding what it measured, whether the paper's claim holds, and the
verdict in words. Nothing here writes Markdown or draws: ``report`` turns records into the report
and its plots. ``Section.to_json`` is what ``reproduce.json`` records for an experiment. Also here:
:func:`pct`, and :func:`timed_cache`, the (view) caches two experiments write.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache.config import CacheConfig
from pipeline.cache.read import LogitCache
from pipeline.cache.writer import build_cache
from pipeline.experiments.reproduce.artefacts import Run
from pipeline.files import slug


def pct(x: float) -> str:
    """A rate as a percentage with one decimal ("12.3 %"), or "n/a" for NaN."""
    return "n/a" if x != x else f"{100 * x:.1f} %"


@dataclass(kw_only=True)
class Section:
    """What one experiment measured, and its verdict.

    Attributes:
        name: the experiment (``main-table``, ...).
        holds: whether the paper's claim holds here.
        verdict: the verdict in words (the report's summary table and the log print it).
        plot: the section's chart, once ``report.draw_plot`` has drawn it.
        seconds: what the experiment took in this invocation (set by ``run_reproduce``).
    """

    name: str
    holds: bool
    verdict: str
    plot: Path | None = None
    seconds: float = 0.0

    def figures(self) -> dict:
        """The experiment's key numbers, as ``reproduce.json`` records them."""
        raise NotImplementedError

    def to_json(self) -> dict:
        """This section's entry of ``reproduce.json``."""
        return {
            "figures": self.figures(),
            "plot": None if self.plot is None else str(self.plot),
            "holds": self.holds,
            "verdict": self.verdict,
            "seconds": self.seconds,
        }


def timed_cache(run: Run, spec: str, views: int, augment: str | None) -> tuple[str, float, int]:
    """A (view) cache of the teacher over ``spec``: (location, seconds it took to write, bytes).

    The seconds are kept beside the cache, so a re-run that reuses it still reports them.
    """
    name = slug(spec, sep="_", max_len=60) + (f"-v{views}-{slug(augment)}" if augment else "")
    location = run.out / "caches" / f"{name}.zarr"
    timing = location.with_suffix(".seconds.json")
    t0 = time.perf_counter()
    res = build_cache(
        CacheConfig(
            teachers=[run.teacher()],
            dataset=spec,
            out=str(location),
            views=views,
            augment=augment,
            seed=run.cfg.seed,
            device=run.cfg.device,
            data_dir=run.cfg.data_dir,
            command=f"kd-pipeline reproduce consistency ({spec}, {views} x {augment})",
            trust_code=run.cfg.trust_code,
        ),
        log=run.log,
        progress=False,
    )
    if res.status != "already-complete" or not timing.is_file():
        timing.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    seconds = float(json.loads(timing.read_text())["seconds"])
    return str(location), seconds, LogitCache(location).info().size_on_disk
