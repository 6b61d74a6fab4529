"""Run files: a command's options as TOML (``--config FILE.toml``, ``--print-config``,
``config.toml`` in run directories).

A run file holds a config's declared fields (:func:`pipeline.options.option`) by name, nested
configs as tables (``[train]``, ``[base.train]``), exactly as :func:`run_toml` writes them. A value
is read as its flag would be: text goes through the field's declared parser (``"1200,1200"``,
``"2G"``, ``"3=+3.5"``), and native TOML values are taken where they fit the field (an integer
for an ``int``, numbers for a ``float``, a list of numbers for a comma list, a table for
``KEY=VALUE`` pairs). What :func:`run_toml` writes reads back to the same config, exactly.

Nothing here imports click or torch: a library caller can write and read run files too, and the
CLI's ``--help`` stays light.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, KDError
from pipeline.files import atomic_write_text
from pipeline.options import Option, declared, nested, option, owned
from pipeline.redact import is_secret

#: The replayable run file every run directory with a ``config.json`` also holds.
RUN_FILE = "config.toml"


@dataclass
class RunFile:
    """``--config`` and ``--print-config``: the run-file options every configured command has."""

    config: str | None = option(
        None,
        metavar="FILE.toml",
        help="Read the options from this TOML file first (the fields by name, nested configs as "
        "tables, as --print-config writes them); options given on the command line override it.",
    )
    print_config: bool = option(
        False, help="Print the resolved options as TOML (a --config file) and exit without running."
    )


@dataclass(frozen=True)
class Declared:
    """One declared field of a config, at its place in the nesting.

    Attributes:
        path: The field names from the top config down: ``("train", "epochs")``.
        owner: The dataclass that declares the field.
        field: The dataclass field.
        option: Its command-line declaration.
        default: Its value in the top config's default instance.
        annotation: Its resolved type annotation (``float | None``, ``list[int]``, ...).
    """

    path: tuple[str, ...]
    owner: type
    field: dataclasses.Field
    option: Option
    default: Any
    annotation: Any

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    @property
    def key(self) -> str:
        """The dotted run-file key: ``train.epochs``."""
        return ".".join(self.path)


def declared_fields(
    cls: type, base: Any = None, prefix: tuple[str, ...] = (), skip: frozenset = frozenset()
) -> Iterator[Declared]:
    """The declared fields of ``cls`` (nested configs flattened, at any depth), less the paths in
    ``skip`` and those a nested config's owner sets itself (see
    :func:`pipeline.options.nested_config`)."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if path in skip:
            continue
        value = getattr(base, f.name)
        if nested(hints[f.name]):
            inner = skip | {(*path, *o.split(".")) for o in owned(f)}
            yield from declared_fields(hints[f.name], value, path, inner)
            continue
        opt = declared(f)
        if opt is not None:
            yield Declared(path, cls, f, opt, value, hints[f.name])


def scalar_type(annotation: Any) -> type:
    """``int | None`` -> int; lists, dicts and anything else -> str (parsed by the declaration)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    t = args[0] if len(args) == 1 else str
    return t if t in (int, float, str, bool) else str


def _takes_list(annotation: Any) -> bool:
    """Whether a field holds a list (``list[int] | None``, ``list[float]``), not one value."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (list, tuple) or any(
        typing.get_origin(a) in (list, tuple) for a in args
    )


def value_at(config: Any, path: Iterable[str]) -> Any:
    """``config``'s value at a field path, e.g. ``("train", "seed")``."""
    for name in path:
        config = getattr(config, name)
    return config


# --------------------------------------------------------------------------------- TOML writing
class Section(dict):
    """A table written as a ``[section]`` (a nested config), not inline (a mapping value)."""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _value(v: Any) -> str:
    """One TOML value: the types a config field holds (bool, int, float, str, lists, mappings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        # repr is the shortest text that reads back to the same float, with the "." or exponent
        # TOML needs, and inf, -inf and nan spelled as TOML spells them.
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"a run file cannot hold {type(v).__name__} values ({v!r})")


def dump_toml(table: Mapping[str, Any]) -> str:
    """``table`` as TOML: plain keys first, then each :class:`Section` as ``[a.b]``, in order.

    Mappings that are not sections (a field's value, e.g. ``class_bias``) are inline tables.
    ``tomllib.loads(dump_toml(t))`` equals ``t`` (tuples read back as lists).
    """
    lines: list[str] = []
    _dump(table, (), lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    plain = [(k, v) for k, v in table.items() if not isinstance(v, Section)]
    if path and plain:
        lines += ["", "[" + ".".join(_key(p) for p in path) + "]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in plain]
    for k, v in table.items():
        if isinstance(v, Section):
            _dump(v, (*path, k), lines)


# ------------------------------------------------------------------------ configs <-> run files
_OMIT = object()


def _none_from_zero(parse: Callable[[Any], Any]) -> bool:
    try:
        return parse("0") is None
    except (ValueError, KDError):
        return False


def _plain(v: Any) -> Any:
    """A field's value as TOML holds it: credentials left out (never recorded), keys as text."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items() if not is_secret(str(k))}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def toml_value(d: Declared, value: Any) -> Any:
    """The run-file value of field ``d`` holding ``value`` (``_OMIT``: leave the key out).

    TOML has no null: None is left out when it is the default, and written as 0 for a field
    whose parser reads 0 as None (``--grad-clip 0``: no clipping), as its flag would be given.
    """
    if value is None:
        if d.default is None:
            return _OMIT
        if d.option.parse is not None and _none_from_zero(d.option.parse):
            return 0
        raise TypeError(f"{d.key} is None, which a run file cannot hold")
    return _plain(value)


def config_table(
    configs: Iterable[tuple[Any, Iterable[Declared]]], into: Section | None = None
) -> Section:
    """The run-file table of ``configs``: each config's value of each of its ``Declared``
    fields, nested configs as sections."""
    table = Section() if into is None else into
    for cfg, fields in configs:
        for d in fields:
            value = toml_value(d, value_at(cfg, d.path))
            if value is _OMIT:
                continue
            at = table
            for name in d.path[:-1]:
                at = at.setdefault(name, Section())
            at[d.path[-1]] = value
    return table


def run_toml(cfg: Any) -> str:
    """The run file of ``cfg``: every declared field (``--config`` reads it back to ``cfg``)."""
    return dump_toml(config_table([(cfg, declared_fields(type(cfg)))]))


def write_run_file(directory: str | Path, cfg: Any) -> Path:
    """Write ``DIRECTORY/config.toml``, the run file that replays ``cfg`` (with ``--config``)."""
    return atomic_write_text(Path(directory) / RUN_FILE, run_toml(cfg))


# ----------------------------------------------------------------------------- reading run files
def load_toml(path: str | Path) -> dict:
    """The table in the TOML file ``path``.

    Raises:
        ConfigError: the file is not TOML (with the line and column tomllib names).
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            [f"--config {path}: not a TOML file ({e}); write it as --print-config does"]
        ) from None


def _expected(d: Declared) -> str:
    opt = d.option
    if opt.choices is not None:
        return "one of " + ", ".join(opt.choice_names() or [])
    if opt.multiple:
        return "a string or a list of strings" + (" or a table" if opt.parse else "")
    if opt.parse is not None:
        what = f"text like the flag's ({opt.metavar})" if opt.metavar else "text like the flag's"
        return what + (" or a list" if "list" in str(d.annotation) else "")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[
        scalar_type(d.annotation)
    ]


def _item_text(v: Any) -> str:
    """A mapping value as a ``KEY=VALUE`` item's text: JSON, strings as they are unless they
    would read back as something else (``"true"``, ``"12"``)."""
    if isinstance(v, str):
        try:
            json.loads(v)
        except ValueError:
            return v
    return json.dumps(v)


def _pairs(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"client_kwargs": {"region_name": "eu"}}`` -> ``["client_kwargs.region_name=eu"]``."""
    out = []
    for k, v in table.items():
        if isinstance(v, Mapping):
            out += _pairs(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={_item_text(v)}")
    return out


def _exists(path: str) -> str:
    if not path.startswith("hf:") and not Path(path).exists():
        raise ValueError(f"path {path!r} does not exist")
    return path


def from_toml(d: Declared, raw: Any) -> Any:
    """Field ``d``'s value from the run-file value ``raw``: text through the field's declared
    parser, as its flag would be; native TOML values where they fit the field.

    Raises:
        ValueError: what was expected and what was found.
    """
    opt = d.option
    found = f"got {raw!r}"
    if opt.multiple:
        if isinstance(raw, str):
            items = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            items = list(raw)
        elif isinstance(raw, dict) and opt.parse is not None:
            items = _pairs(raw)
        else:
            raise ValueError(f"expected {_expected(d)}, {found}")
        if opt.exists:
            items = [_exists(x) for x in items]
        return opt.parse(items) if opt.parse is not None else items
    if isinstance(raw, dict) or (isinstance(raw, list) and opt.parse is None):
        raise ValueError(f"expected {_expected(d)}, {found}")
    if opt.parse is not None:
        scalar = (str, int, float)
        if isinstance(raw, bool) or (
            isinstance(raw, list) and not all(isinstance(x, scalar) for x in raw)
        ):
            raise ValueError(f"expected {_expected(d)}, {found}")
        if isinstance(raw, list) and any(isinstance(x, bool) for x in raw):
            raise ValueError(f"expected {_expected(d)}, {found}")
        listed = _takes_list(d.annotation)
        if isinstance(raw, list) and not listed:  # memory_budget = [1] is not a size
            raise ValueError(f"expected {_expected(d)}, {found}")
        if isinstance(raw, int) and not listed and scalar_type(d.annotation) is int:
            return raw  # exact (a size in bytes); the parser would go through a float
        return opt.parse(",".join(map(str, raw)) if isinstance(raw, list) else str(raw))
    t = scalar_type(d.annotation)
    if opt.choices is not None:
        if not isinstance(raw, str) or raw not in (opt.choice_names() or []):
            raise ValueError(f"expected {_expected(d)}, {found}")
        return raw
    if t is bool or isinstance(raw, bool):  # a flag: true or false, nothing else
        if t is bool and isinstance(raw, bool):
            return raw
        raise ValueError(f"expected {_expected(d)}, {found}")
    if t in (int, float) and isinstance(raw, str):
        try:
            return t(raw)  # text, as the flag takes it
        except ValueError:
            raise ValueError(f"expected {_expected(d)}, {found}") from None
    if t is int and isinstance(raw, int):
        return raw
    if t is float and isinstance(raw, (int, float)):
        return float(raw)
    if t is str and isinstance(raw, str):
        return _exists(raw) if opt.exists else raw
    raise ValueError(f"expected {_expected(d)}, {found}")


def _unknown(key: str, known: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    placed = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    # Closeness of the names alone: on whole dotted keys a shared "train." prefix makes any
    # two keys of that table look alike (train.bogus -> train.log_to).
    by_leaf: dict[str, list[str]] = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    table = key.rpartition(".")[0]
    close = placed or [
        min(by_leaf[name], key=lambda k: k.rpartition(".")[0] != table)
        for name in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    ]
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown key {key!r}{hint}"


class FileProblems(ConfigError):
    """A run file's unknown keys and unparsable values (``problems``), with the field values
    that did parse (``values``, by field path), so that the caller can check those as well and
    report everything at once."""

    def __init__(self, problems: list[str], values: dict[tuple[str, ...], Any]) -> None:
        super().__init__(problems)
        self.values = values


def file_values(
    fields: Iterable[Declared], table: Mapping[str, Any], source: str
) -> dict[tuple[str, ...], Any]:
    """The field values a run file gives, by field path.

    Args:
        fields: The fields the command takes (its keys; nested configs' as tables).
        table: The file's table (:func:`load_toml`).
        source: How problems name the file (``--config run.toml``).

    Raises:
        FileProblems: every unknown key (named, with the key meant where one is close) and every
            value its field refuses, all at once (with the values that parsed).
    """
    fields = list(fields)
    by_path = {d.path: d for d in fields}
    sections = {d.path[:i] for d in fields for i in range(1, len(d.path))}
    known = sorted(d.key for d in fields)
    values: dict[tuple[str, ...], Any] = {}
    problems: list[str] = []

    def walk(t: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for k, v in t.items():
            path = (*prefix, k)
            key = ".".join(path)
            if path in by_path:
                try:
                    values[path] = from_toml(by_path[path], v)
                except (ValueError, OverflowError, KDError) as e:
                    problems.append(f"{source}: {key}: {e}")
            elif path in sections and isinstance(v, dict):
                walk(v, path)
            elif path in sections:
                problems.append(
                    f"{source}: {key} holds options: expected a table [{key}], got {v!r}"
                )
            else:
                problems.append(f"{source}: {_unknown(key, known)}")

    walk(table, ())
    if problems:
        # The values that did parse ride along: the command checks the config built from them
        # too, so a file's unknown keys, bad types and out-of-range values come in one report.
        raise FileProblems(problems, values)
    return values
