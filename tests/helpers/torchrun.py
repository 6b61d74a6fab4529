"""``kd-pipeline`` under the real ``torchrun`` (``--standalone``, two processes) and alone, with an
audit hook in the launched processes that logs what each rank writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from tests.helpers.process import cli_command, run, subprocess_env

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Logs what the launched processes write under $KD_TEST_WATCH (per rank, at exit).
WATCH = textwrap.dedent(
    """
    import atexit, os, sys

    _root = os.environ.get("KD_TEST_WATCH")
    if _root and "RANK" in os.environ:
        _seen = []

        def _path(p):
            try:
                return os.path.abspath(os.fsdecode(p))
            except TypeError:
                return ""

        def _hook(event, args):
            if event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
                paths = [_path(args[0])]
            elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir"):
                paths = [_path(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            else:
                return
            if any(p.startswith(_root) for p in paths):
                _seen.append(event + " " + " ".join(paths))

        def _save():
            name = os.path.join(os.environ["KD_TEST_WATCH_LOG"], "rank%s.log" % os.environ["RANK"])
            with open(name, "w") as f:
                f.write("\\n".join(_seen))

        atexit.register(_save)
        sys.addaudithook(_hook)
    """
)


def env(tmp: Path, **extra: str) -> dict[str, str]:
    """``subprocess_env`` with ``TMP/site/sitecustomize.py`` (the ``WATCH`` hook) first on the
    path; set ``KD_TEST_WATCH`` and ``KD_TEST_WATCH_LOG`` in ``extra`` to log writes."""
    (tmp / "site").mkdir(parents=True, exist_ok=True)
    (tmp / "site" / "sitecustomize.py").write_text(WATCH)
    return subprocess_env(tmp / "site", **extra)


def torchrun(tmp: Path, args: list[str], **extra: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m stages.cli ARGS`` to its end."""
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "stages.cli", *args]
    return run(cmd, env=env(tmp, **extra))


def single(tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The same command in one plain process (same environment)."""
    return run(cli_command(*args), env=env(tmp))


def rows_per_epoch(directory: Path, n: int, epochs: int) -> list[list[int]]:
    """Rows each of 2 ranks trained on per epoch (``KD_RECORD_ROWS`` files in ``directory``),
    checked to cover all ``n`` rows exactly once per epoch."""
    sizes = []
    for epoch in range(epochs):
        parts = [np.load(directory / f"rows-rank{r}-epoch{epoch}.npy") for r in range(2)]
        everyone = np.concatenate(parts)
        assert len(everyone) == n and np.array_equal(np.sort(everyone), np.arange(n)), epoch
        sizes.append([len(p) for p in parts])
    return sizes
