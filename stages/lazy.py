"""A click group whose commands are imported on first use: ``kd-pipeline --help`` and
``--version`` list them without importing torch or any command's code."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, MutableMapping

import click

from stages.boundary import KDGroup


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's commands: ``name -> "module:attribute"`` until one is looked up, then the
    command itself (imported once)."""

    def __init__(self, lazy: Mapping[str, str]) -> None:
        self.lazy = dict(lazy)
        self.loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self.loaded:
            module, _, attr = self.lazy[name].partition(":")  # KeyError: no such command
            self.loaded[name] = getattr(importlib.import_module(module), attr)
        return self.loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self.loaded[name] = command

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.loaded.pop(name, None)
        self.lazy.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self.lazy or name in self.loaded

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self.lazy, *self.loaded]))

    def __len__(self) -> int:
        return len(set(self.lazy) | set(self.loaded))


class LazyGroup(KDGroup):
    """A :class:`KDGroup` whose commands are listed by name and short help, and imported when
    one is run (or its own ``--help`` shown).

    Args:
        lazy: ``name -> ("module:attribute", short help)``; the short help is what the group's
            ``--help`` lists (``tests/stages/test_run_files.py`` checks that it is the command's
            own).
    """

    def __init__(self, *args: object, lazy: Mapping[str, tuple[str, str]], **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.short_helps = {name: short for name, (_, short) in lazy.items()}
        self.commands = LazyCommands({name: target for name, (target, _) in lazy.items()})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands and their short help, as click lists them, without importing any."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in self.short_helps:
                # shortened as click shortens a command's own help
                listed = click.Command(name, help=self.short_helps[name])
                rows.append((name, listed.get_short_help_str(limit)))
            elif not self.commands[name].hidden:
                rows.append((name, self.commands[name].get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
