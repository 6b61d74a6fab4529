"""The allocator settings every kd-pipeline process starts with (glibc): applied, exported to
child processes, and left alone when the user opts out or set their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import allocator

REPO = Path(__file__).resolve().parents[2]
NAMES = [name for name, _ in allocator.SETTINGS.values()]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*NAMES, allocator.OPT_OUT]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applied_and_exported_to_children(clean_env: pytest.MonkeyPatch) -> None:
    assert allocator.keep_freed_memory() is True
    assert {n: os.environ[n] for n in NAMES} == {
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
        "MALLOC_TOP_PAD_": str(512 << 20),
    }


def test_the_opt_out_and_the_users_own_settings_are_respected(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv(allocator.OPT_OUT, "default")
    assert allocator.keep_freed_memory() is False
    assert not any(n in os.environ for n in NAMES)
    clean_env.delenv(allocator.OPT_OUT)
    clean_env.setenv("MALLOC_TOP_PAD_", "4096")
    assert allocator.keep_freed_memory() is False
    assert os.environ["MALLOC_TOP_PAD_"] == "4096" and "MALLOC_MMAP_MAX_" not in os.environ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_every_command_starts_with_it() -> None:
    """The CLI's group applies it before any command (here ``--help`` of one)."""
    env = {k: v for k, v in os.environ.items() if k not in [*NAMES, allocator.OPT_OUT]}
    code = (
        "import os, sys\n"
        "from stages.cli import main\n"
        "try:\n"
        "    main(['cache', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ.get('MALLOC_MMAP_MAX_'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0"
