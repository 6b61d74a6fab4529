"""What the spec registries share (``NAME:ARG[:key=value...]`` for datasets and models).

- :class:`SourceData`: what a dataset source returns (the unmodified split).
- :func:`spec_options`: a model spec's ``key=value`` items, each parsed by its own parser, with
  one wording for an unknown key or a bad value.
- the value parsers the specs use (``ValueError`` on bad text): :func:`positive_int`,
  :func:`positive_float`, :func:`probability`, :func:`int_list`.

Below :mod:`pipeline.datasets`, :mod:`pipeline.models` and :mod:`pipeline.sequences`, so the
sequence sources and models use these without importing private names from the modules whose
registries they join. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ModelSpecError

__all__ = [
    "SourceData",
    "int_list",
    "positive_float",
    "positive_int",
    "probability",
    "spec_options",
]


@dataclass
class SourceData:
    """What a dataset source returns: the unmodified split.

    Attributes:
        x: inputs (N, *sample shape), or a lazy input column.
        y: labels (N,) or (N, P) for token sequences, or None for an unlabeled split.
        class_names: one name per class.
        source: what the source records about where the data came from.
        extend: for sources with per-sample state beyond x and y (token sequences: masks, a
            tokenizer): ``extend(dataset, kept)`` finishes the ``pipeline.datasets.Dataset``
            with the rows the modifiers kept (indices into x).
    """

    x: np.ndarray
    y: np.ndarray | None
    class_names: list[str]
    source: dict
    extend: Callable[[Any, np.ndarray], Any] | None = None


def spec_options(spec: str, items: list[str], allowed: dict[str, Callable]) -> dict:
    """Parse a model spec's ``key=value`` items (``["dropout=0.5"]`` -> ``{"dropout": 0.5}``).

    Raises:
        ModelSpecError: an item is not ``key=value`` with a key in ``allowed``, or its parser
            refused the value.
    """
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ModelSpecError(
                f"model spec {spec!r}: unknown option {item!r}; expected key=value with key in "
                f"{', '.join(allowed)}"
            )
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise ModelSpecError(f"model spec {spec!r}: bad value for {key}: {value!r}") from None
    return out


def int_list(v: str) -> list[int]:
    """``"32,64"`` -> ``[32, 64]``: one or more positive integers."""
    vals = [int(s) for s in v.split(",") if s]
    if not vals or any(s <= 0 for s in vals):
        raise ValueError(v)
    return vals


def positive_int(v: str) -> int:
    """An integer > 0."""
    n = int(v)
    if n <= 0:
        raise ValueError(v)
    return n


def positive_float(v: str) -> float:
    """A float > 0 (NaN refused)."""
    x = float(v)
    if not x > 0:  # also refuses nan
        raise ValueError(v)
    return x


def probability(v: str) -> float:
    """A dropout probability in [0, 1)."""
    p = float(v)
    if not 0 <= p < 1:
        raise ValueError(v)
    return p
