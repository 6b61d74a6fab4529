"""Click parameters generated from the config fields' declarations (``pipeline.options``).

``@configured(StudentConfig, Only(Display, "quiet"))`` adds one click parameter per declared field
(nested config dataclasses such as ``train: TrainConfig`` are flattened into the same command, at
any depth, less the fields a nested config's owner sets itself) and
calls the command with the built configs instead of loose keyword arguments. Only values the user
actually typed override a config's own defaults, so a default exists once: on its field.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
from click.core import ParameterSource

from pipeline.errors import ConfigError, KDError, distinct_problems
from pipeline.options import Option, declared, field_problems, nested, owned

#: The attribute every generated click parameter carries: ``"StudentConfig.temperature"``.
FIELD_ATTR = "kd_field"


@dataclass(frozen=True)
class Only:
    """Select some of a config's declared fields for a command (``exclude`` drops some instead)."""

    cls: type
    fields: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __init__(self, cls: type, *fields: str, exclude: tuple[str, ...] = ()) -> None:
        object.__setattr__(self, "cls", cls)
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "exclude", exclude)


@dataclass(frozen=True)
class _Param:
    path: tuple[str, ...]  # ("train", "epochs")
    owner: type  # the dataclass that declares the field
    field: dataclasses.Field
    option: Option
    default: Any
    annotation: Any

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def _params(
    cls: type, base: Any, prefix: tuple[str, ...] = (), skip: frozenset = frozenset()
) -> Iterator[_Param]:
    """The declared fields of ``cls`` (nested configs flattened), less the paths in ``skip``
    (those a nested config's owner sets itself, see :func:`pipeline.options.nested_config`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if path in skip:
            continue
        value = getattr(base, f.name)
        if nested(hints[f.name]):
            inner = skip | {(*path, *o.split(".")) for o in owned(f)}
            yield from _params(hints[f.name], value, path, inner)
            continue
        opt = declared(f)
        if opt is not None:
            yield _Param(path, cls, f, opt, value, hints[f.name])


class Parsed(click.ParamType):
    """A click type for a declared parser: sizes (``2G``), comma lists (``1,2,4``), ``3=+3.5``."""

    def __init__(self, parse: Callable[[str], Any], metavar: str | None) -> None:
        self.parse = parse
        self.name = (metavar or "TEXT").lower()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # already converted (a default or a value set in Python)
            return value
        try:
            return self.parse(value)
        except (ValueError, OverflowError, KDError) as e:  # OverflowError: int(float("inf"))
            self.fail(str(e), param, ctx)


def _scalar_type(annotation: Any) -> type:
    """``int | None`` -> int; lists, dicts and anything else -> str (parsed by the declaration)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    t = args[0] if len(args) == 1 else str
    return t if t in (int, float, str, bool) else str


class ExistingOrHF(click.Path):
    """An existing path, or ``hf:DIR`` (a transformers model directory, checked when loaded)."""

    def __init__(self) -> None:
        super().__init__(exists=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.startswith("hf:"):
            return value
        return super().convert(value, param, ctx)


def _click_param(p: _Param, dest: str) -> click.Parameter:
    opt = p.option
    ctype: Any = _scalar_type(p.annotation)
    if opt.choices is not None:
        ctype = click.Choice(opt.choice_names())
    elif opt.exists:
        ctype = ExistingOrHF()
    elif opt.parse is not None and not opt.multiple:
        ctype = Parsed(opt.parse, opt.metavar)
    elif opt.parse is not None:
        ctype = str  # each item as typed; the declared parse takes them all (KEY=VALUE pairs)
    if opt.argument:
        param: click.Parameter = click.Argument(
            [dest], required=opt.required, type=ctype, metavar=opt.metavar
        )
    else:
        names = [*opt.names(p.path[-1]), dest]
        flag = ctype is bool
        # click shows this default in --help; the value used when the flag is absent is still the
        # field's own (``build`` skips parameters whose source is the default).
        if flag or p.default is None or p.default == "" or p.default == {}:
            default: Any = None
        elif opt.multiple:
            default = tuple(p.default) or None
        elif opt.show is not None:
            default = opt.show(p.default)
        else:
            default = p.default
        param = click.Option(
            names,
            type=None if flag else ctype,
            is_flag=flag,
            default=default,
            multiple=opt.multiple,
            required=opt.required,
            help=opt.help,
            show_default=default is not None,
            metavar=opt.metavar,
        )
    setattr(param, FIELD_ATTR, f"{p.owner.__name__}.{p.field.name}")
    return param


def _selected(spec: type | Only) -> tuple[type, list[_Param]]:
    only = spec if isinstance(spec, Only) else Only(spec)
    params = list(_params(only.cls, only.cls()))
    if only.fields:
        unknown = set(only.fields) - {p.dest for p in params}
        if unknown:
            raise TypeError(f"{only.cls.__name__} declares no option {sorted(unknown)}")
        params = [p for p in params if p.dest in only.fields]
    return only.cls, [p for p in params if p.dest not in only.exclude]


def _dest(cls: type, p: _Param) -> str:
    return f"{cls.__name__.lower()}__{p.dest}"


def _value(p: _Param, raw: Any) -> Any:
    opt = p.option
    try:
        if opt.parse is not None and opt.multiple:
            return opt.parse(raw)
    except (ValueError, OverflowError, KDError) as e:
        hint = p.path[-1] if opt.argument else opt.names(p.path[-1])[0]
        raise click.BadParameter(str(e), param_hint=hint) from None
    if opt.negate:
        return not raw
    if opt.parse is not None:
        return raw  # converted by its click type
    if opt.multiple:
        return list(raw)
    return raw


def build(cls: type, params: list[_Param], kwargs: dict, ctx: click.Context) -> Any:
    """The config ``cls`` with the values the user gave; every other field keeps its default."""
    base = cls()
    changes: dict[tuple[str, ...], dict[str, Any]] = {}
    for p in params:
        dest = _dest(cls, p)
        if ctx.get_parameter_source(dest) in (None, ParameterSource.DEFAULT):
            continue
        changes.setdefault(p.path[:-1], {})[p.path[-1]] = _value(p, kwargs[dest])
    for path, values in changes.items():  # nested configs (at any depth): replaced in place
        base = _replaced(base, path, values)
    return base


def _replaced(config: Any, path: tuple[str, ...], values: dict[str, Any]) -> Any:
    """``config`` with ``values`` set in the nested config at ``path`` (``()``: itself)."""
    if not path:
        return dataclasses.replace(config, **values)
    inner = _replaced(getattr(config, path[0]), path[1:], values)
    return dataclasses.replace(config, **{path[0]: inner})


def check_all(configs: list[Any]) -> list[str]:
    """Every problem of ``configs``, in order, each once (a nested config's own checks are in its
    owner's ``validate()``; the generic ones also run for configs that have none)."""
    problems: list[str] = []
    for cfg in configs:
        problems += field_problems(cfg)
        if hasattr(cfg, "validate"):
            try:
                cfg.validate()
            except ConfigError as e:
                problems += e.problems
    return distinct_problems(problems)


# Configs whose ``out`` is a cache by design: cache-logits writes (resumes) one; copy and pack
# check their destination themselves (an unfinished copy of the same source is resumed).
CACHE_OUTPUTS = ("CacheConfig", "CacheToolConfig")


def _refuse_cache_outputs(cfg: Any) -> None:
    """Every other command's output locations (``out``, ``*_out``) must not be a cache."""
    if not dataclasses.is_dataclass(cfg) or type(cfg).__name__ in CACHE_OUTPUTS:
        return
    from pipeline.cache.location import refuse_cache_output

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if (f.name == "out" or f.name.endswith("_out")) and isinstance(value, str) and value:
            refuse_cache_output(value, "--" + f.name.replace("_", "-"))


def configured(*specs: type | Only) -> Callable[[Callable], Callable]:
    """Decorator: generate the click parameters of ``specs`` and call the command with configs.

    The command receives one built config per spec, in order. Configs with a ``resolve()`` method
    get it applied (derived defaults such as output directories named from the config), and
    configs with a ``validate()`` method are validated before the command runs: every command
    reports a bad option before any work, not after its first steps. Every config's numeric
    fields get :func:`~pipeline.options.field_problems` (finite, within their declared bounds)
    too, with or without a ``validate()``, and the problems of all the command's configs are
    reported together, once each.
    """
    selected = [_selected(s) for s in specs]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            ctx = click.get_current_context()
            configs = []
            for cls, params in selected:
                cfg = build(cls, params, kwargs, ctx)
                configs.append(cfg.resolve() if hasattr(cfg, "resolve") else cfg)
            problems = check_all(configs)
            if problems:
                raise ConfigError(problems)
            for cfg in configs:
                _refuse_cache_outputs(cfg)
            return fn(*configs)

        command.__click_params__ = [  # click reads this list bottom-up, as its decorators do
            _click_param(p, _dest(cls, p))
            for cls, params in reversed(selected)
            for p in reversed(params)
        ]
        _refuse_shared_flags(fn.__name__, command.__click_params__)
        return command

    return decorate


def _refuse_shared_flags(command: str, params: list[click.Parameter]) -> None:
    """Two fields with one flag (a nested config's and its owner's) would leave one of them
    unreachable from the command line: an error when the command is defined, not a lost option.
    """
    seen: dict[str, str] = {}
    for param in params:
        for flag in getattr(param, "opts", []):
            owner = getattr(param, FIELD_ATTR)
            if seen.setdefault(flag, owner) != owner:
                raise TypeError(
                    f"{command}: {flag} is declared by both {seen[flag]} and {owner}; exclude "
                    "one (Only(..., exclude=...)) or mark it owned (nested_config(owned=...))"
                )
