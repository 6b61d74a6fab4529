"""``kd-pipeline bench``: the performance figures of the two-stage design (see ``pipeline.bench``)."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.bench import run_bench


def run(scale: str = "small", device: str = "auto", out: str | None = None,
        log: Callable[[str], None] = print) -> dict:
    return run_bench(scale, device, out, log)
