"""Progress bars: the one rule for when a step draws one.

A bar is drawn only when it is wanted (no ``--quiet``), its stream is a terminal and there is
something to count. Redirected into a log file, tqdm's carriage-return redraws become one long
line of partial bars per run, so there they are off; an empty bar (``sweep: 0setting``) says
nothing, so it is off too.

A bar that is off is not a tqdm at all: even a disabled tqdm creates tqdm's process-shared lock (a
multiprocessing semaphore). In a dask worker process that semaphore outlives a worker stopped by
Ctrl-C, and the resource tracker then warns of "leaked semaphore objects" at exit.

Where no bar draws but progress is wanted (output redirected to a log, a batch job), a long loop
says how far it is with :class:`ProgressLines`: a plain line with the rate and the time left
every :data:`LINE_SECONDS` seconds, or sooner at each further tenth of the loop, but never
within a third of that (:data:`LINE_GAP`) after the previous line; so a log shows a run is
alive without a line per step, and a loop shorter than that says nothing.
:func:`progress_bar` returns such lines (a :class:`LineBar`) instead of a bar that would not
draw, and adds them to a bar that draws on the terminal while the output goes to a file
(:class:`BarAndLines`: ``kd-pipeline ... > log``). So every step with a bar (caching,
``cache verify``, ``cache copy``/``pack``, sweeps) has them; training epochs count batches and
rows and use :class:`ProgressLines` directly. ``$KD_PROGRESS_SECONDS`` sets the interval (0: a
line at every update, for tests).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm.auto import tqdm


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    enabled: bool = True,
    file: IO[str] | None = None,
    log: Callable[[str], None] | None = print,
    **kwargs: Any,
) -> Bar:
    """A tqdm bar that draws only on a terminal; elsewhere progress lines (see the module
    docstring).

    Args:
        iterable: what to iterate over, as for ``tqdm``; None for a bar updated by hand.
        total: how many units make 100 %; 0 turns the bar off.
        enabled: False for ``--quiet`` (never draw, no lines).
        file: the stream (tqdm's default: stderr); it must be a terminal for the bar to draw.
        log: where the progress lines go when the bar does not draw (the command's output);
            None: no lines either.
        **kwargs: passed to ``tqdm`` (``desc``, ``unit``, ``unit_scale``, ``leave``, ...).

    Returns:
        A tqdm bar, a :class:`LineBar` or a :class:`NoBar`: the latter two accept the same calls
        and draw nothing (check ``bar.disable`` before routing messages through ``bar.write``).
    """
    stream = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not (enabled and total != 0):
        return NoBar(iterable)
    desc = kwargs.get("desc") or "progress"
    if not _isatty(stream):
        if log is None or not total:  # no total, no time left to say
            return NoBar(iterable)
        return LineBar(iterable, total, desc, log, kwargs)
    bar = tqdm(iterable, total=total, file=stream, **kwargs)
    if log is not None and total and not _isatty(sys.stdout):
        # The bar draws on the terminal while the output goes to a file: the file gets the lines.
        return BarAndLines(bar, LineBar(None, total, desc, log, kwargs))
    return bar


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


class LineBar(NoBar):
    """What :func:`progress_bar` returns where no bar draws but progress is wanted: the same
    calls, counted into :class:`ProgressLines` (``cache-logits: 1920/6000 rows, 5,310 rows/s,
    1s left``; ``verify: 12.0 MB/40.0 MB, 3.1 MB/s, 9s left`` for a bar counting bytes).

    Args:
        iterable: iterated over as by a bar (each item counts 1).
        total: units that make the whole loop.
        desc: the lines' start.
        log: where the lines go.
        bar_kwargs: the bar's ``unit`` (``B`` with ``unit_scale``: sizes in bytes).
    """

    def __init__(
        self,
        iterable: Iterable | None,
        total: float,
        desc: str,
        log: Callable[[str], None],
        bar_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(iterable)
        unit = str(bar_kwargs.get("unit", "it"))
        nbytes = unit == "B" and bool(bar_kwargs.get("unit_scale"))
        units = unit if nbytes else _plural(unit)
        self.lines = ProgressLines(
            int(total), desc, log, units=units, rate_units=units, nbytes=nbytes
        )

    def __iter__(self) -> Iterator:
        for item in super().__iter__():
            yield item
            self.update(1)

    def update(self, n: float = 1) -> None:
        """Count ``n`` units; a line when it is time (see :class:`ProgressLines`)."""
        self.n += n
        self.lines.update(int(n), int(n))


class BarAndLines:
    """A drawn bar (stderr is a terminal) that also counts into progress lines for an output
    that is not one (``kd-pipeline ... > log``): the calls a bar takes, passed to both."""

    disable = False

    def __init__(self, bar: tqdm, lines: LineBar) -> None:
        self.bar, self.lines = bar, lines

    @property
    def n(self) -> float:
        return self.bar.n

    def __iter__(self) -> Iterator:
        for item in self.bar:
            yield item
            self.lines.update(1)

    def update(self, n: float = 1) -> None:
        self.bar.update(n)
        self.lines.update(n)

    def close(self) -> None:
        self.bar.close()

    def write(self, s: str) -> None:
        self.bar.write(s)


def _plural(unit: str) -> str:
    return unit if unit.endswith("s") else unit + ("es" if unit.endswith(("ch", "sh")) else "s")


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextmanager
def transformers_bars_on_terminal_only() -> Iterator[None]:
    """Within this block, ``transformers``' own bars (``Loading weights``, ``Writing model
    shards``) draw only where kd-pipeline's would: on a terminal (stderr), never into a log.

    Their state is restored after the block, so a library user's setting is kept. Without
    transformers installed (or importable) the block runs as it is.
    """
    if _isatty(sys.stderr):
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # noqa: BLE001 - absent or broken: the caller reports that itself
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


#: The longest wait between two progress lines where no bar draws (seconds);
#: ``$KD_PROGRESS_SECONDS`` overrides it.
LINE_SECONDS = 30.0
#: A line also each time another 1/LINE_PARTS of the loop is done (sooner than LINE_SECONDS) ...
LINE_PARTS = 10
#: ... but never within this part of the interval after the previous line (10 s by default), so
#: a short loop prints nothing and a log holds at most one line per LINE_GAP * LINE_SECONDS.
LINE_GAP = 1 / 3


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
    5,310 rows/s, 2m 10s left``, one every ``interval`` seconds, or at each further tenth of the
    loop once a third of ``interval`` passed since the previous line (none for a loop shorter
    than that, none at its end: the loop's own end line says the rest).

    Args:
        total: steps that make the whole loop (e.g. batches in an epoch).
        desc: what is counted, the line's start (``member 0 epoch 2/3``).
        log: where the lines go (the command's output).
        units: what the steps are called in the line (plural).
        interval: seconds between lines (default :func:`line_seconds`).
        rate_units: what the rate counts (``rows``: ``5,310 rows/s``).
        nbytes: steps and rates are bytes, written as sizes (``12.0 MB``, ``3.1 MB/s``).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        log: Callable[[str], None],
        units: str = "batches",
        interval: float | None = None,
        rate_units: str = "rows",
        nbytes: bool = False,
    ) -> None:
        self.total, self.desc, self.log, self.units = total, desc, log, units
        self.rate_units, self.nbytes = rate_units, nbytes
        self.interval = line_seconds() if interval is None else interval
        self.done = self.rows = 0
        self.start = self.last = time.monotonic()
        self.tenths = 0  # the tenths of the loop done at the last line

    def update(self, rows: int, steps: int = 1) -> None:
        """Count ``steps`` steps of ``rows`` rows in all; print a line when it is time."""
        self.done += steps
        self.rows += rows
        now = time.monotonic()
        if self.done >= self.total:
            return  # the loop's own end line says the rest
        tenths = self.done * LINE_PARTS // self.total
        gap = now - self.last
        if gap < self.interval and (tenths <= self.tenths or gap < self.interval * LINE_GAP):
            return
        self.last, self.tenths = now, tenths
        spent = max(now - self.start, 1e-9)
        left = spent / self.done * (self.total - self.done)
        if self.nbytes:
            counted = f"{_size(self.done)}/{_size(self.total)}, {_size(self.rows / spent)}/s"
        else:
            counted = (
                f"{self.done}/{self.total} {self.units}, "
                f"{_rate(self.rows / spent)} {self.rate_units}/s"
            )
        self.log(f"{self.desc}: {counted}, {_duration(left)} left")


def _rate(r: float) -> str:
    """``5,310``, or ``0.05`` for a slow loop (a sweep's settings per second)."""
    return f"{r:,.0f}" if r >= 10 else f"{r:.2f}"


def _size(n: float) -> str:
    """``812 B``, ``12.0 MB``: a byte count in decimal units, as tqdm's unit_scale shows it."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_lines(
    total: int,
    desc: str,
    log: Callable[[str], None] | None,
    *,
    enabled: bool = True,
    bar: Bar | None = None,
) -> ProgressLines | None:
    """:class:`ProgressLines` for a loop where progress is wanted (``enabled``, a ``log``) and
    ``bar`` (the loop's :func:`progress_bar`) does not draw, or draws while the output (stdout)
    is not a terminal; None otherwise."""
    drawn = bar is not None and not bar.disable and _isatty(sys.stdout)
    if not enabled or log is None or total <= 1 or drawn:
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
Bar = tqdm | NoBar | BarAndLines
