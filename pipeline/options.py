"""Options declared once, on the config dataclass fields they fill.

A config field that the command line may set is made with :func:`option` instead of
``dataclasses.field``: its default, help text, flag name, choices and parser live in one place,
and ``stages/params.py`` generates the click options from them. Nothing here imports click, so
the library stays usable without the CLI, and a config built in Python gets the same defaults
as one built from flags.

Choices are given as the registry itself (a tuple or a dict of names), never a copy, so a new
loss, ensemble method or storage kind is one registry entry. Values that are not plain
``int``/``float``/``str``/``bool`` (sizes like ``2G``, comma lists, ``KEY=VALUE`` pairs) carry a
``parse`` from this module and a ``show`` that turns the default back into the text a user
would type, for ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

from pipeline.errors import NOT_FINITE

META_KEY = "kd_option"
#: A nested config field's metadata: the sub-fields (dotted paths) its owner sets itself.
OWNED_KEY = "kd_owned"


@dataclass(frozen=True)
class Option:
    """How one config field appears on the command line.

    Attributes:
        help: One line for ``--help``; a default of None is explained here ("[default: ...]").
        flag: The long flag; None derives it from the field name (``batch_size`` ->
            ``--batch-size``).
        short: An optional short flag, e.g. ``-T``.
        parse: Text -> value for values that are not a plain scalar (raises ``ValueError`` with
            what was expected); for ``multiple`` options it receives the tuple of all values.
        show: The default's text for ``--help`` when ``str(default)`` is not what a user types.
        choices: The registry the value must come from (its keys when it is a mapping).
        multiple: The flag may repeat; the values reach ``parse`` (or the field) as a list.
        argument: A positional argument instead of a flag.
        negate: A boolean field that defaults to True and is switched off by this flag.
        exists: The value is a path that must exist (checked by click).
        metavar: The placeholder shown in ``--help``.
        required: The command cannot run without it.
        most: The largest value the field accepts (every number of a list or mapping); None:
            :data:`INT_LIMIT` for integers, no bound but finiteness for floats (see
            :func:`field_problems`).
        least: The smallest value, for fields whose config has no check of its own (seeds).
    """

    help: str
    flag: str | None = None
    short: str | None = None
    parse: Callable[[Any], Any] | None = None
    show: Callable[[Any], str] | None = None
    choices: Sequence[str] | Mapping[str, Any] | None = None
    multiple: bool = False
    argument: bool = False
    negate: bool = False
    exists: bool = False
    metavar: str | None = None
    required: bool = False
    most: float | None = None
    least: float | None = None

    def names(self, field_name: str) -> list[str]:
        """The flag spellings, long first: ``["--temperature", "-T"]``."""
        long = self.flag or "--" + field_name.replace("_", "-")
        return [long, self.short] if self.short else [long]

    def choice_names(self) -> list[str] | None:
        return None if self.choices is None else list(self.choices)


def option(
    default: Any = MISSING, *, default_factory: Callable[[], Any] | Any = MISSING, **spec: Any
) -> Any:
    """A dataclass field that the command line may set (see :class:`Option` for ``spec``)."""
    meta = {META_KEY: Option(**spec)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested_config(cls: type, owned: Iterable[str] = ()) -> Any:
    """A field holding a whole nested config ``cls`` (its declared options become the command's).

    Args:
        cls: The nested config dataclass; its default instance is the field's default.
        owned: Dotted paths of ``cls``'s fields (``"temperature"``, ``"train.seed"``) that the
            owning config sets itself (a sweep sets each setting's temperature and run
            directory): the command line offers no flag for them, and the owner's
            ``validate()`` refuses a value given there in Python.
    """
    return dataclasses.field(default_factory=cls, metadata={OWNED_KEY: tuple(owned)})


def owned(field: dataclasses.Field) -> tuple[str, ...]:
    """The dotted paths of a nested config field that its owner sets (see :func:`nested_config`)."""
    return tuple(field.metadata.get(OWNED_KEY, ()))


def declared(field: dataclasses.Field) -> Option | None:
    """The field's command-line declaration, or None for a field the CLI never sets."""
    return field.metadata.get(META_KEY)


def nested(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) and isinstance(cls, type)


# ------------------------------------------------------------------------------- generic checks
#: The largest integer a field takes unless its declaration says otherwise (``most``): counts,
#: sizes in rows, indices and workers all fit in 32 bits, and a larger value is a typo (or a
#: test of the tool) that would otherwise reach an allocation or a zarr shape.
INT_LIMIT = 2**31 - 1


def _numbers(value: Any) -> Iterator[Any]:
    """The numbers a field holds: itself, a list's items, a mapping's values (``3=+3.5``)."""
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def field_problems(cfg: Any) -> list[str]:
    """The problems every numeric field shares, whatever its config: one line per bad field.

    Floats must be finite (``inf`` and ``nan`` parse as floats, and each comparison of a config's
    own ``validate()`` would let one of them through: ``inf > 0``, ``not nan <= 0``); integers must
    be at most the declaration's ``most`` (else :data:`INT_LIMIT`), floats too where declared,
    and at least its ``least`` where declared.
    Nested configs (``train: TrainConfig``) are not walked: their own ``validate()`` calls this.
    Every config's ``validate()`` starts with these, so the CLI and library callers both refuse
    such a value before anything is created.
    """
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            continue
        opt = declared(f)
        most = opt.most if opt is not None else None
        least = opt.least if opt is not None else None
        for v in _numbers(value):
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{f.name} {NOT_FINITE}, got {value}")
                break
            if least is not None and v < least:
                problems.append(f"{f.name} must be >= {least:g}, got {value}")
                break
            limit = most if most is not None else (INT_LIMIT if isinstance(v, int) else None)
            if limit is not None and v > limit:
                shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
                problems.append(f"{f.name} must be at most {shown}, got {value}")
                break
    return problems


# ---------------------------------------------------------------------------------- value parsers
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str) -> int:
    """``512M``, ``2G``, ``1.5GiB``, ``1000000`` -> bytes."""
    v = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    scale = _SIZE_UNITS.get(v[-1:], 1)
    try:
        size = int(float(v[:-1] if scale > 1 else v) * scale)
    except (ValueError, OverflowError):  # "inf" overflows int(), "nan" is a ValueError
        raise ValueError(f"expected a size like 512M or 2G, got {value!r}") from None
    if size < 0:
        raise ValueError(f"expected a size like 512M or 2G, got the negative {value!r}")
    return size


def show_size(n: int) -> str:
    """Bytes -> the shortest exact ``2G`` / ``512M`` spelling (inverse of :func:`parse_size`)."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


def parse_floats(value: str) -> list[float]:
    """``"1,2,4"`` -> ``[1.0, 2.0, 4.0]``."""
    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected numbers like 1,2,4, got {value!r}") from None


def parse_ints(value: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``."""
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected integers like 0,1,2, got {value!r}") from None


def parse_indices(value: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]`` (member indices)."""
    try:
        return parse_ints(value)
    except ValueError:
        raise ValueError(f"expected indices like 0,2, got {value!r}") from None


def show_list(values: Iterable[Any] | None) -> str:
    """``[1.0, 2.0]`` -> ``"1,2"`` (numbers as a user types them)."""
    if values is None:
        return ""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def parse_class_deltas(items: Iterable[str]) -> dict[int, float]:
    """``["3=+3.5", "7=-1"]`` -> ``{3: 3.5, 7: -1.0}``."""
    out: dict[int, float] = {}
    for item in items:
        cls, eq, delta = str(item).partition("=")
        try:
            if not eq:
                raise ValueError
            out[int(cls)] = float(delta)
        except ValueError:
            raise ValueError(f"expected CLASS=DELTA like 3=+3.5, got {item!r}") from None
    return out


def parse_clip(value: str) -> float | None:
    """A gradient-norm bound; 0 disables clipping (None)."""
    return float(value) or None
