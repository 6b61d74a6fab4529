"""Progress bars: the one rule for when a step draws one.

A bar is drawn only when it is wanted (no ``--quiet``), its stream is a terminal and there is
something to count. Redirected into a log file, tqdm's carriage-return redraws become one long
line of partial bars per run, so there they are off; an empty bar (``sweep: 0setting``) says
nothing, so it is off too.

A bar that is off is not a tqdm at all: even a disabled tqdm creates tqdm's process-shared lock (a
multiprocessing semaphore). In a dask worker process that semaphore outlives a worker stopped by
Ctrl-C, and the resource tracker then warns of "leaked semaphore objects" at exit.

Where no bar draws but progress is wanted (output redirected to a log, a batch job), a long loop
says how far it is with :class:`ProgressLines`: one plain line at most every
:data:`LINE_SECONDS` seconds, so a log shows a run is alive without a line per step.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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


#: Seconds between two progress lines where no bar draws; ``$KD_PROGRESS_SECONDS`` overrides it.
LINE_SECONDS = 30.0


def line_seconds() -> float:
    """The interval between progress lines: ``$KD_PROGRESS_SECONDS`` when it is a number >= 0,
    else :data:`LINE_SECONDS`."""
    try:
        value = float(os.environ.get("KD_PROGRESS_SECONDS", ""))
    except ValueError:
        return LINE_SECONDS
    return value if value >= 0 else LINE_SECONDS


class ProgressLines:
    """A long loop's progress as plain lines where no bar draws: ``DESC: 120/400 batches,
    5,310 rows/s, 2m 10s left``, at most one every ``interval`` seconds (none for a loop
    shorter than that).

    Args:
        total: steps that make the whole loop (e.g. batches in an epoch).
        desc: what is counted, the line's start (``member 0 epoch 2/3``).
        log: where the lines go (the command's output).
        units: what the steps are called in the line (plural).
        interval: seconds between lines (default :func:`line_seconds`).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        log: Callable[[str], None],
        units: str = "batches",
        interval: float | None = None,
    ) -> None:
        self.total, self.desc, self.log, self.units = total, desc, log, units
        self.interval = line_seconds() if interval is None else interval
        self.done = self.rows = 0
        self.start = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        """Count one step of ``rows`` rows; print a line when ``interval`` has passed."""
        self.done += 1
        self.rows += rows
        now = time.monotonic()
        if now - self.last < self.interval or self.done >= self.total:
            return  # the loop's own end line says the rest
        self.last = now
        spent = max(now - self.start, 1e-9)
        left = spent / self.done * (self.total - self.done)
        self.log(
            f"{self.desc}: {self.done}/{self.total} {self.units}, "
            f"{self.rows / spent:,.0f} rows/s, {_duration(left)} left"
        )


def progress_lines(
    total: int,
    desc: str,
    log: Callable[[str], None] | None,
    *,
    enabled: bool = True,
    bar: Bar | None = None,
) -> ProgressLines | None:
    """:class:`ProgressLines` for a loop where progress is wanted (``enabled``, a ``log``) and
    ``bar`` (the loop's :func:`progress_bar`) does not draw; None otherwise."""
    if not enabled or log is None or total <= 1 or (bar is not None and not bar.disable):
        return None
    return ProgressLines(total, desc, log)


def _duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``1h 02m``: a time left, to the second under an hour."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


#: What :func:`progress_bar` returns, for annotations.
Bar = tqdm | NoBar
