"""Processes: the CLI (or any Python) in a subprocess of this checkout, waiting for a process to
reach a point, killing it, and measuring its peak memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def subprocess_env(*path_first: str | Path, **extra: str) -> dict[str, str]:
    """The environment of a process started by a test: this checkout on ``PYTHONPATH`` (after
    ``path_first``, before what was there), one BLAS/OpenMP thread, unbuffered output, then
    ``extra``."""
    parts = [*map(str, path_first), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in parts if p),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def cli_command(*args: str) -> list[str]:
    """``kd-pipeline ARGS`` as an argv of this interpreter (``python -m stages.cli``)."""
    return [sys.executable, "-m", "stages.cli", *args]


def run(
    cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root to its end (text output captured)."""
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=subprocess_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real ``kd-pipeline ARGS`` in its own process (``sys.argv`` is what a header records,
    and the process's own stdout/stderr are what a user sees)."""
    return run(cli_command(*args), timeout=timeout)


def start(cmd: list[str], env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    """Start ``cmd`` from the repository root without waiting; stdout and stderr merged into a
    text pipe unless ``popen`` says otherwise."""
    kw: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    kw.update(popen)
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env() if env is None else env, **kw)


def wait_for_path(path: Path, p: subprocess.Popen, timeout: float = 60) -> bool:
    """Poll until ``path`` exists (True), or the process ends or the timeout passes (False)."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end and p.poll() is None:
        if path.exists():
            return True
        time.sleep(0.002)
    return False


def kill(p: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
    """Send ``sig`` to ``p`` (if it still runs) and wait for it: its exit status."""
    if p.poll() is None:
        p.send_signal(sig)
    return p.wait(timeout=timeout)


PEAK_RSS = """
import resource, sys
from stages.cli import main
try:
    main(sys.argv[1:])
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sys.stderr.write("\\nPEAK_RSS %d\\n" % peak)
"""


def peak_rss(*args: str, timeout: float = 1800) -> tuple[int, str, int]:
    """Run ``kd-pipeline ARGS`` in a fresh process: (exit code, its stdout and stderr, peak
    resident memory of that process in bytes; DataLoader workers are other processes)."""
    done = run([sys.executable, "-c", PEAK_RSS, *args], timeout=timeout)
    rss = int(done.stderr.rsplit("PEAK_RSS", 1)[1].split()[0])
    return done.returncode, done.stdout + done.stderr.rsplit("\nPEAK_RSS", 1)[0], rss


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
