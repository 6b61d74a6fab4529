"""Progress bars: the one rule for when a step draws one.

A bar is drawn only when it is wanted (no ``--quiet``), its stream is a terminal and there is
something to count. Redirected into a log file, tqdm's carriage-return redraws become one long
line of partial bars per run, so there they are off; an empty bar (``sweep: 0setting``) says
nothing, so it is off too.

A bar that is off is not a tqdm at all: even a disabled tqdm creates tqdm's process-shared lock (a
multiprocessing semaphore). In a dask worker process that semaphore outlives a worker stopped by
Ctrl-C, and the resource tracker then warns of "leaked semaphore objects" at exit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    enabled: bool = True,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> Bar:
    """A tqdm bar that draws only on a terminal (see the module docstring).

    Args:
        iterable: what to iterate over, as for ``tqdm``; None for a bar updated by hand.
        total: how many units make 100 %; 0 turns the bar off.
        enabled: False for ``--quiet`` (never draw).
        file: the stream (tqdm's default: stderr); it must be a terminal for the bar to draw.
        **kwargs: passed to ``tqdm`` (``desc``, ``unit``, ``leave``, ...).

    Returns:
        A tqdm bar, or a :class:`NoBar` that accepts the same calls and draws nothing (check
        ``bar.disable`` before routing messages through ``bar.write``).
    """
    stream = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not (enabled and total != 0 and _isatty(stream)):
        return NoBar(iterable)
    return tqdm(iterable, total=total, file=stream, **kwargs)


class NoBar:
    """What :func:`progress_bar` returns when no bar is drawn: the calls a bar takes, doing nothing
    (and iterating over the iterable, if one was given)."""

    disable = True
    n = 0

    def __init__(self, iterable: Iterable | None = None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: float = 1) -> None:
        """Count nothing (no bar)."""

    def close(self) -> None:
        """Nothing to close."""

    def write(self, s: str) -> None:
        """Plain print, as ``tqdm.write`` does when no bar is drawn."""
        print(s)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


#: What :func:`progress_bar` returns, for annotations.
Bar = tqdm | NoBar
