"""PNG charts for reports (matplotlib, imported only when a chart is drawn; never needs a
display)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import MissingExtraError
from pipeline.files import atomic_write


def optional_plot(draw: Callable[[], Path | None], log: Callable[[str], None]) -> Path | None:
    """``draw()``'s PNG, or None with one line saying which extra draws it: a plot is a nicety
    next to a report and its numbers, so a base install still finishes the command."""
    try:
        return draw()
    except MissingExtraError as e:
        log(f"no plot: {e}")
        return None


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend.

    Raises:
        MissingExtraError: matplotlib is not installed (it is the ``plots`` extra).
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("drawing a PNG plot", "matplotlib", "plots") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically (a reader never sees half a PNG) and close it."""
    path = Path(path)
    fig.tight_layout()
    # The temporary name does not end in .png: pass the format matplotlib infers from ``path``.
    fmt = path.suffix[1:] or None
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        pyplot().close(fig)


def bar_chart(path: Path, labels: list[str], values: list[float], ylabel: str) -> Path:
    """One bar per label, each annotated with its value."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.8))
    ax.bar(range(len(labels)), values, color="tab:blue")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:g}", ha="center", va="bottom")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    return save(fig, path)


def line_chart(
    path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str
) -> Path:
    """One line per named (x, y) series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)
