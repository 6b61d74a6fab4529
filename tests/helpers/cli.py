"""The ``kd-pipeline`` command line in process, through click's ``CliRunner``."""

from __future__ import annotations

import dataclasses
import sys
import traceback
from collections.abc import Iterator

import click
from click.testing import CliRunner, Result


def invoke(*args: str) -> Result:
    """Run ``kd-pipeline ARGS`` in this process; click's result, any exception caught in it."""
    from stages.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def cli(*args: str) -> tuple[int, str]:
    """Run ``kd-pipeline ARGS`` in this process: (exit code, output).

    The CLI turns every failure into a message and an exit code, so an exception that gets past
    it (anything but ``SystemExit``) is a bug: it fails the test as an ``AssertionError`` that
    names it, with its traceback.
    """
    res = invoke(*args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception))
        raise AssertionError(
            f"kd-pipeline {' '.join(args)}: the CLI let {res.exception!r} through:\n{tb}"
        ) from res.exception
    return res.exit_code, res.output


def one_error(code: int, out: str, *facts: str) -> str:
    """Exit 2 with exactly one ``error:`` line holding every fact; returns that line."""
    assert code == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    for fact in facts:
        assert fact in lines[0], (fact, lines[0])
    return lines[0]


def commands(
    group: click.Group | None = None, prefix: str = ""
) -> Iterator[tuple[str, click.Command]]:
    """Every leaf command under ``group`` (default: ``kd-pipeline`` itself), recursively, with its
    space-separated name (``"cache verify"``)."""
    if group is None:
        from stages.cli import main

        group = main
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def field_of(qualified: str) -> dataclasses.Field:
    """The config field ``Class.field`` names: the class is looked up in every loaded module of
    the library (the CLI has imported each command's config)."""
    cls_name, name = qualified.split(".")
    for mod_name, mod in sorted(sys.modules.items()):
        cls = getattr(mod, cls_name, None) if mod_name.startswith("pipeline") else None
        if cls is not None and dataclasses.is_dataclass(cls):
            return {f.name: f for f in dataclasses.fields(cls)}[name]
    raise AssertionError(f"no config class {cls_name}")
