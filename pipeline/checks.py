"""Field checks shared by every config and by the losses: one wording per rule.

Each check returns ``None`` when the value is fine, else the problem as one line
(``"temperature must be > 0, got 0.0"``), so a ``validate()`` can collect every problem and raise
them together::

    problems = collect(positive("temperature", t), in_range("alpha", a, 0, 1),
                       one_of("loss", loss, LOSSES))
    if problems:
        raise ConfigError(problems)

The comparisons are written so that NaN fails every check. Standard library only: the configs and
the losses both import this.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "at_least",
    "collect",
    "in_range",
    "one_of",
    "positive",
    "temperature",
]

#: The softmax temperatures any option accepts. Far outside the paper's range (1 to 20) on both
#: sides: above it float32 soft targets are uniform to within rounding (and T^2 scales that
#: noise), so the high-temperature limit is ``--loss logit-mse``, not a larger T; below it
#: ``logits / T`` overflows float32 (1e-300 turns every row into inf and nan).
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1000.0


def positive(name: str, value: float | None, *, optional: bool = False) -> str | None:
    """``value > 0`` ("temperature must be > 0, got 0.0").

    With ``optional``, None is fine too ("grad_clip must be > 0 or None, got -1.0").
    """
    if optional and value is None:
        return None
    if value is not None and value > 0:
        return None
    return f"{name} must be > 0{' or None' if optional else ''}, got {value}"


def at_least(name: str, value: float, lo: float, *, unit: str = "") -> str | None:
    """``value >= lo`` ("epochs must be >= 1, got 0"; "jitter must be >= 0 pixels, got -1")."""
    if value >= lo:
        return None
    return f"{name} must be >= {lo}{f' {unit}' if unit else ''}, got {value}"


def in_range(name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> str | None:
    """``lo <= value <= hi`` ("alpha must be in [0, 1], got 1.5"); ``hi_open``: ``< hi``."""
    if lo <= value and (value < hi if hi_open else value <= hi):
        return None
    return f"{name} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {value}"


def one_of(name: str, value: object, choices: Iterable[str], *, prose: bool = False) -> str | None:
    """``value in choices`` ("optimizer must be one of adam, adamw, sgd, got 'lbfgs'").

    ``prose`` words the choices as a sentence instead of a list ("lr_schedule must be cosine or
    constant, got 'step'").
    """
    options = list(choices)
    if value in options:
        return None
    if prose and len(options) > 1:
        listed = ", ".join(options[:-1]) + " or " + options[-1]
    else:
        listed = ("" if prose else "one of ") + ", ".join(options)
    return f"{name} must be {listed}, got {value!r}"


def temperature(name: str, value: float) -> str | None:
    """A softmax temperature: ``> 0`` ("temperature must be > 0, got 0.0") and within
    [:data:`MIN_TEMPERATURE`, :data:`MAX_TEMPERATURE`]."""
    if not (value is not None and value > 0):
        return positive(name, value)
    if MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        return None
    return (
        f"{name} must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {value} (for the "
        "high-temperature limit use --loss logit-mse)"
    )


def collect(*problems: str | None) -> list[str]:
    """The problems among check results, in order (the Nones dropped)."""
    return [p for p in problems if p is not None]
