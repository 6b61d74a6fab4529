"""Progress bars: the one rule for when a step draws one.

A bar is drawn only when it is wanted (no ``--quiet``), its stream is a terminal and there is
something to count. Redirected into a log file, tqdm's carriage-return redraws become one long
line of partial bars per run, so there they are off; an empty bar (``sweep: 0setting``) says
nothing, so it is off too.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm.auto import tqdm


def progress_bar(
    iterable: Any = None,
    *,
    total: float | None = None,
    enabled: bool = True,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar that draws only on a terminal (see the module docstring).

    Args:
        iterable: what to iterate over, as for ``tqdm``; None for a bar updated by hand.
        total: how many units make 100 %; 0 turns the bar off.
        enabled: False for ``--quiet`` (never draw).
        file: the stream (tqdm's default: stderr); it must be a terminal for the bar to draw.
        **kwargs: passed to ``tqdm`` (``desc``, ``unit``, ``leave``, ...).

    Returns:
        The bar; a disabled one accepts ``update`` and ``close`` and draws nothing (check
        ``bar.disable`` before routing messages through ``bar.write``).
    """
    stream = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    on = enabled and total != 0 and _isatty(stream)
    return tqdm(iterable, total=total, file=stream, disable=not on, **kwargs)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
