"""The one registration mechanism: a named :class:`Registry` of choices, each with a help line.

Every set of names a user picks from (dataset sources, model specs, augmentations, losses,
ensemble methods, optimisers, learning-rate schedules, similarities, storage kinds, ...) is a
``Registry``. An entry is added with a name and a one-line help, as a decorator or a call::

    LOSSES = Registry("losses", "loss", lambda message: ConfigError([message]))

    @LOSSES.register("soft-ce", "cross-entropy against the teacher's softened targets")
    class SoftCE: ...

    OPTIMIZERS.register("sgd", "SGD with --momentum", "SGD")

and looked up with :meth:`Registry.get`, whose error for an unknown name has one wording in
every registry (``unknown loss 'x'; expected one of a, b``). A registry is a read-only mapping
(``name in reg``, iteration, ``reg[name]``), so option declarations take it as their
``choices`` and old call sites keep working.

Entries come from three places, all loaded on the first lookup, never by an import at the bottom
of a module:

- the module that defines the registry (entries written beside it);
- the built-in modules :data:`pipeline.builtins.BUILTINS` lists for the registry's name (e.g.
  the token-sequence sources in ``pipeline.sequences.data``), imported by name;
- third-party plug-ins: ``importlib.metadata`` entry points in the group
  ``kd_pipeline.<registry name>``. A plug-in module may register itself on import (its entry
  point then names the module or any object in it); otherwise the object the entry point loads
  is registered under the entry point's name, with its docstring's first line as help.

The standard library and ``pipeline.errors`` only, so every layer may import it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar, overload

from pipeline.builtins import BUILTINS
from pipeline.errors import KDError

__all__ = ["Entry", "Registry", "unknown_name"]

T = TypeVar("T")
_NO_DEFAULT: Any = object()


def unknown_name(what: str, name: object, choices: list[str], where: str = "") -> str:
    """The one wording for a name no registry holds.

    Args:
        what: what the registry holds, singular ("model", "storage kind").
        name: the name asked for.
        choices: the names it holds, in the order they are listed.
        where: where the name was given, appended after it (" in spec 'x:1'").

    Returns:
        ``unknown model 'vit' in spec 'vit:1'; expected one of cnn, mlp``.
    """
    return f"unknown {what} {name!r}{where}; expected one of {', '.join(choices)}"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered choice: its name, its one-line help, and the registered value."""

    name: str
    help: str
    value: T


class Registry(Mapping[str, T]):
    """A named set of choices ``name -> T``, each with a one-line help.

    Args:
        name: The registry's name: its key in :data:`pipeline.builtins.BUILTINS` and its entry
            point group's suffix (``kd_pipeline.<name>``), e.g. ``"datasets"``.
        what: What one entry is, singular, for messages ("dataset", "optimizer").
        error: Builds the exception :meth:`get` raises from the message (a ``KDError`` kind);
            ``[name]`` raises ``KeyError`` with the same message, as a mapping does.
        sort: List the choices sorted by name (else in registration order, which is the order
            the default comes first in).
    """

    def __init__(
        self,
        name: str,
        what: str,
        error: Callable[[str], Exception] = KeyError,
        *,
        sort: bool = False,
    ) -> None:
        self.name = name
        self.what = what
        self.error = error
        self.sort = sort
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False
        self._loading = False
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Registry({self.name!r}: {', '.join(self._entries)})"

    # ----------------------------------------------------------------------------- registering
    @overload
    def register(self, name: str, help: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, help: str, value: T) -> T: ...

    def register(self, name: str, help: str, value: Any = _NO_DEFAULT) -> Any:
        """Add ``value`` under ``name``: ``reg.register(name, help, value)`` returns the value,
        ``@reg.register(name, help)`` registers what it decorates and returns it unchanged.

        Raises:
            ValueError: the name is taken (two built-ins, or a plug-in shadowing a built-in,
                would otherwise silently replace one another), or the help is not one line.
        """
        if not name or name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered in {self.name}")
        if not help or "\n" in help:
            raise ValueError(f"{self.what} {name!r}: the help must be one non-empty line")
        if value is _NO_DEFAULT:

            def wrap(obj: T) -> T:
                self._entries[name] = Entry(name, help, obj)
                return obj

            return wrap
        self._entries[name] = Entry(name, help, value)
        return value

    # ---------------------------------------------------------------------------------- loading
    def _load(self) -> None:
        """Import the built-in modules and the plug-ins, once (on the first lookup)."""
        if self._loaded:
            return
        with self._lock:  # loader threads may look names up at once: one of them loads
            self._load_once()

    def _load_once(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True  # a built-in module that looks a name up while importing
        try:
            for module in BUILTINS.get(self.name, ()):
                importlib.import_module(module)
            for ep in entry_points(group=f"kd_pipeline.{self.name}"):
                if ep.name in self._entries:
                    continue  # a built-in keeps its name; the plug-in's module registered it
                try:
                    obj = ep.load()
                except Exception as e:  # a broken plug-in: say which, not a bare traceback
                    # A KDError whatever this registry's own error kind: the CLI prints it as the
                    # user's problem to fix (exit 2), never as an internal error.
                    raise KDError(
                        f"the {self.what} plug-in {ep.name!r} ({ep.value}, entry point group "
                        f"kd_pipeline.{self.name}) failed to load: {type(e).__name__}: {e}; "
                        "fix or uninstall the package that provides it"
                    ) from e
                if ep.name not in self._entries:
                    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
                    self.register(ep.name, doc[0] if doc else f"plug-in {ep.value}", obj)
            self._loaded = True
        finally:
            self._loading = False

    # -------------------------------------------------------------------------------- looking up
    def choices(self) -> list[str]:
        """The names, as options and messages list them."""
        self._load()
        return sorted(self._entries) if self.sort else list(self._entries)

    def entry(self, name: str, *, where: str = "") -> Entry[T]:
        """The entry registered under ``name``; raises the registry's error otherwise."""
        self._load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.error(self.unknown(name, where=where)) from None

    @overload
    def get(self, name: str, *, where: str = "") -> T: ...

    @overload
    def get(self, name: str, default: T | None, *, where: str = "") -> T | None: ...

    def get(self, name: str, default: Any = _NO_DEFAULT, *, where: str = "") -> Any:
        """The value registered under ``name``.

        Args:
            name: the name asked for.
            default: returned for an unknown name instead of raising (as ``Mapping.get``).
            where: where the name was given, for the message (" in spec 'x'").

        Raises:
            The registry's error kind with :func:`unknown_name`'s message.
        """
        if default is not _NO_DEFAULT:
            self._load()
            entry = self._entries.get(name)
            return default if entry is None else entry.value
        return self.entry(name, where=where).value

    def problem(self, field: str, name: object) -> str | None:
        """For a config's ``validate()``: None when ``name`` is registered, else the message
        (``unknown loss 'x' (loss); expected one of ...``) naming the config ``field``."""
        if name in self:
            return None
        same = field.replace("_", " ") == self.what
        return self.unknown(name, where="" if same else f" ({field})")

    def unknown(self, name: object, *, where: str = "") -> str:
        """The message for an unknown ``name``: :func:`unknown_name` over :meth:`choices`."""
        return unknown_name(self.what, name, self.choices(), where)

    def help(self, name: str) -> str:
        """The one-line help of ``name``."""
        return self.entry(name).help

    def help_lines(self, width: int = 0) -> list[str]:
        """``name  help`` per choice, names padded to ``width`` (default: the longest)."""
        names = self.choices()
        pad = max([width, *(len(n) for n in names)])
        return [f"{n.ljust(pad)}  {self._entries[n].help}" for n in names]

    # ---------------------------------------------------------------------------------- Mapping
    def __getitem__(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name].value
        except KeyError:
            raise KeyError(self.unknown(name)) from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)
