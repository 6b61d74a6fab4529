"""Click parameters generated from the config fields' declarations (``pipeline.options``).

``@configured(StudentConfig, Only(Display, "quiet"))`` adds one click parameter per declared field
(nested config dataclasses such as ``train: TrainConfig`` are flattened into the same command, at
any depth, less the fields a nested config's owner sets itself) and
calls the command with the built configs instead of loose keyword arguments. Only values the user
actually typed override a config's own defaults, so a default exists once: on its field.

Every configured command also takes ``--config FILE.toml`` (the same fields by name, read first;
typed options override them) and ``--print-config`` (the resolved configs as that TOML, then exit
0): see ``pipeline/runfile.py`` and ``docs/run-files.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
from click.core import ParameterSource

from pipeline.errors import ConfigError, KDError, distinct_problems
from pipeline.options import Option, field_problems
from pipeline.runfile import (
    Declared,
    FileProblems,
    RunFile,
    config_table,
    declared_fields,
    dump_toml,
    file_values,
    load_toml,
    scalar_type,
)

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


# One declared field at its place in a command's configs (shared with run files).
_Param = Declared


def _params(cls: type, base: Any) -> Iterator[_Param]:
    """The declared fields of ``cls`` (nested configs flattened), less those a nested config's
    owner sets itself (see :func:`pipeline.options.nested_config`)."""
    return declared_fields(cls, base)


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


class ExistingOrHF(click.Path):
    """An existing path, or ``hf:DIR`` / ``hf-image:DIR`` (a transformers model directory,
    checked when loaded)."""

    def __init__(self) -> None:
        super().__init__(exists=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.startswith(("hf:", "hf-image:")):
            return value
        return super().convert(value, param, ctx)


#: The click names of ``--config`` and ``--print-config`` (no config field's dest is like them).
RUN_FILE_DESTS = ("run_file__config", "run_file__print_config")
#: Configs that say how a command prints, not what it runs: accepted in a run file, never
#: printed by ``--print-config`` (nor recorded with a run).
NOT_RECORDED = ("Display",)

#: ``ctx.meta`` key: the run file ``--config`` named (eager: read before the other options).
CONFIG_META = "kd_config_file"


class _FileFilled:
    """A required parameter that a ``--config`` file may give instead: click's own check is
    skipped when a file is named, and :func:`configured` checks it once the file is read."""

    required: bool

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        if not (self.required and ctx.meta.get(CONFIG_META)):
            return super().process_value(ctx, value)  # type: ignore[misc]
        self.required = False
        try:
            return super().process_value(ctx, value)  # type: ignore[misc]
        finally:
            self.required = True


class _Option(_FileFilled, click.Option):
    pass


class _Argument(_FileFilled, click.Argument):
    pass


def _run_file_params() -> list[click.Parameter]:
    """``--config FILE.toml`` (eager, so required options may come from it) and
    ``--print-config``, declared on :class:`pipeline.runfile.RunFile`."""
    fields = {d.path[-1]: d for d in declared_fields(RunFile)}

    def remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        ctx.meta[CONFIG_META] = value
        return value

    config, show = fields["config"], fields["print_config"]
    params = [
        click.Option(
            [*config.option.names("config"), RUN_FILE_DESTS[0]],
            type=click.Path(exists=True, dir_okay=False),
            is_eager=True,
            callback=remember,
            metavar=config.option.metavar,
            help=config.option.help,
        ),
        click.Option(
            [*show.option.names("print_config"), RUN_FILE_DESTS[1]],
            is_flag=True,
            help=show.option.help,
        ),
    ]
    for p, d in zip(params, (config, show), strict=True):
        setattr(p, FIELD_ATTR, f"RunFile.{d.field.name}")
    return params


def _with_choice_help(opt: Option) -> str | None:
    """The option's help, followed by each choice's own one-line help when its choices are a
    registry (``adam: torch.optim.Adam; sgd: ...``): the registry, not the option, describes a
    choice, so a new entry documents itself in ``--help``."""
    entries = getattr(opt.choices, "entry", None)
    names = opt.choice_names() or []
    if entries is None or not opt.help or all(f"{n}:" in opt.help for n in names):
        return opt.help  # not a registry, or the help already describes every choice
    described = "; ".join(f"{n}: {entries(n).help}" for n in names)
    return f"{opt.help} Choices: {described}."


def _click_param(p: _Param, dest: str) -> click.Parameter:
    opt = p.option
    ctype: Any = scalar_type(p.annotation)
    if opt.choices is not None:
        ctype = click.Choice(opt.choice_names())
    elif opt.exists:
        ctype = ExistingOrHF()
    elif opt.parse is not None and not opt.multiple:
        ctype = Parsed(opt.parse, opt.metavar)
    elif opt.parse is not None:
        ctype = str  # each item as typed; the declared parse takes them all (KEY=VALUE pairs)
    if opt.argument:
        param: click.Parameter = _Argument(
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
        param = _Option(
            names,
            type=None if flag else ctype,
            is_flag=flag,
            default=default,
            multiple=opt.multiple,
            required=opt.required,
            help=_with_choice_help(opt),
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


def _typed(ctx: click.Context, dest: str) -> bool:
    """Whether the user gave the parameter ``dest`` on the command line (not its default)."""
    return ctx.get_parameter_source(dest) not in (None, ParameterSource.DEFAULT)


def build(
    cls: type,
    params: list[_Param],
    kwargs: dict,
    ctx: click.Context,
    from_file: dict[tuple[str, ...], Any] | None = None,
) -> Any:
    """The config ``cls`` with the values the user gave: a run file's (``from_file``, by field
    path), then the command line's over them; every other field keeps its default."""
    base = cls()
    changes: dict[tuple[str, ...], dict[str, Any]] = {}
    for p in params:
        dest = _dest(cls, p)
        if _typed(ctx, dest):
            value = _value(p, kwargs[dest])
        elif from_file is not None and p.path in from_file:
            value = from_file[p.path]
        else:
            continue
        changes.setdefault(p.path[:-1], {})[p.path[-1]] = value
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

    With ``--config FILE``, the file's values are set first and typed options over them (a
    problem of the file, such as an unknown key, is reported before anything is built); with
    ``--print-config``, the checked configs are printed as TOML instead of running the command.
    """
    selected = [_selected(s) for s in specs]
    every = [p for _, params in selected for p in params]
    _refuse_shared_keys(every)

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            ctx = click.get_current_context()
            file, show = (kwargs.pop(dest, None) for dest in RUN_FILE_DESTS)
            from_file, file_problems = None, []
            if file is not None:
                try:
                    from_file = file_values(every, load_toml(file), f"--config {file}")
                except FileProblems as e:  # reported with the checks of what did parse
                    from_file, file_problems = e.values, e.problems
                _require(ctx, selected, from_file)
            configs = []
            for cls, params in selected:
                cfg = build(cls, params, kwargs, ctx, from_file)
                configs.append(cfg.resolve() if hasattr(cfg, "resolve") else cfg)
            problems = file_problems + check_all(configs)
            if problems:
                raise ConfigError(problems)
            if show:
                recorded = [
                    (cfg, params)
                    for cfg, (cls, params) in zip(configs, selected, strict=True)
                    if cls.__name__ not in NOT_RECORDED
                ]
                click.echo(dump_toml(config_table(recorded)), nl=False)
                return None
            for cfg in configs:
                _refuse_cache_outputs(cfg)
            return fn(*configs)

        command.__click_params__ = [  # click reads this list bottom-up, as its decorators do
            *reversed(_run_file_params()),
            *(
                _click_param(p, _dest(cls, p))
                for cls, params in reversed(selected)
                for p in reversed(params)
            ),
        ]
        _refuse_shared_flags(fn.__name__, command.__click_params__)
        return command

    return decorate


def _require(
    ctx: click.Context, selected: list[tuple[type, list[_Param]]], from_file: dict
) -> None:
    """Click's check of required parameters, skipped while a run file might give them: each
    one neither typed nor in the file is missing, as click would say."""
    by_name = {param.name: param for param in ctx.command.params}
    for cls, params in selected:
        for p in params:
            dest = _dest(cls, p)
            if p.option.required and not _typed(ctx, dest) and p.path not in from_file:
                raise click.MissingParameter(ctx=ctx, param=by_name[dest])


def _refuse_shared_keys(params: list[_Param]) -> None:
    """Two configs of one command with a field of the same name would share one run-file key."""
    seen: dict[tuple[str, ...], type] = {}
    for p in params:
        if seen.setdefault(p.path, p.owner) is not p.owner:
            raise TypeError(
                f"{'.'.join(p.path)} is a field of both {seen[p.path].__name__} and "
                f"{p.owner.__name__}: one run-file key cannot fill both"
            )


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
