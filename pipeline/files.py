"""Small file rules every step shares: atomic writes and directory-name slugs (no torch, no numpy).

Atomic writes: a reader (a resuming sweep, a second process, a person) sees the old file or the
whole new one, never half of one. The bytes go to a temporary file in the same directory (so the
rename cannot cross file systems), are fsynced, and then ``os.replace`` puts them in place; on any
failure the temporary file is removed and the target is left as it was.

Slugs: one rule turns a spec (``mlp:800,800``, ``py:pkg.mod:f``, ``npz:/d/x.npz:train:exclude=3``)
into one path component, the same names as before, so later runs and sweep resumes find the run
directories and caches made earlier.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.redact import redact_record

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "location_stem",
    "slug",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary name is ``<name>.tmp-<random>``: unique (created exclusively), with ``<name>`` as
    its stem, because some writers derive content from the file name: ``torch.save`` names its zip
    archive after the file's stem, so checkpoints keep the archive name ``member-0.pt/`` they had
    when they were written to ``member-0.pt.tmp``.

    Args:
        path: the file to (re)place. Its directory must exist.

    Yields:
        The temporary file's path (it exists, empty): write it completely, by any means, and close
        it before the ``with`` block ends.
    """
    path = Path(path)
    tmp = _create_beside(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary file, which then replaces ``path`` (:func:`atomic_path`).

    Returns:
        ``path``.
    """
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, as is (no newline translation). Returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, indent=indent, **dumps)`` to ``path`` atomically.

    Every JSON record the tool writes passes here, so here it is redacted
    (:func:`pipeline.redact.redact_record`): no credential reaches a file. No trailing newline:
    every JSON file of a run has always been written without one.

    Returns:
        ``path``.
    """
    return atomic_write_text(path, json.dumps(redact_record(obj), indent=indent, **dumps))


def _create_beside(path: Path) -> Path:
    """Create an empty, new ``<name>.tmp-<random>`` next to ``path``.

    Not ``tempfile.mkstemp``: its files are private (0600) and the replaced file would keep that
    mode; this one gets the mode any new file gets (0666 less the umask), as files always had.
    """
    while True:
        tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        return tmp


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; a best effort (not every file system syncs a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Separators of a spec and what they become in a name: ":" separates a spec's fields ("-" by
# default, or the caller's ``sep``), "," separates list values, "/" is a path's separator (kept
# visible as "_"), and the "=" of ``key=value`` options is dropped ("dropout=0.1" -> "dropout0.1").
_SLUG_FIXED = {",": "-", "/": "_", "=": ""}


def slug(text: str, sep: str = "-", max_len: int | None = None) -> str:
    """The one rule turning a spec into a directory-name part.

    ``mlp:800,800`` -> ``mlp-800-800``; ``py:pkg.mod:f`` -> ``py-pkg.mod-f``;
    ``mlp:30,30:dropout=0.1`` -> ``mlp-30-30-dropout0.1``; with ``sep="_"``,
    ``npz:/d/x.npz:train:exclude=3`` -> ``npz__d_x.npz_train_exclude3``.

    Args:
        text: a model, dataset or other spec.
        sep: what each ``:`` becomes (sweep settings and run names use ``-``; cache names ``_``).
        max_len: keep at most this many characters, from the end (where a dataset spec's
            modifiers are, which tell otherwise equal names apart).

    Returns:
        A name without ``/``, ``:``, ``,`` or ``=``.
    """
    out = text.replace(":", sep)
    for char, repl in _SLUG_FIXED.items():
        out = out.replace(char, repl)
    return out if max_len is None else out[-max_len:]


def location_stem(location: str | Path) -> str:
    """A cache's name without its kind: ``data/caches/fmnist.zarr``, ``fmnist.zarr.zip`` and
    ``s3://bucket/prefix/fmnist.zarr/`` all give ``fmnist``."""
    name = Path(str(location).rstrip("/")).name
    return name.removesuffix(".zip").removesuffix(".zarr")


def data_root() -> Path:
    """Where runs put their outputs by default: ``$KD_OUTPUT_DIR``, else ``data/`` under the
    current directory.

    Never the checkout's own ``data/`` from elsewhere: an installed tool writes where it is run
    (as ``git`` or ``make`` do), so two projects on one machine do not share one output tree. The
    path stays relative, so what runs record and print is what the user would type.
    """
    env = os.environ.get("KD_OUTPUT_DIR")
    return Path(env) if env else Path("data")
