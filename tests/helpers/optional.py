"""Optional packages for tests: import one, or skip the test with why.

``pytest.importorskip`` skips only on ``ImportError``. A torchvision built for another torch (PyPI's
torchvision is a CUDA build, which fails to load next to the CPU-only torch CI installs) raises
``RuntimeError`` while importing, and so does anything that imports it (transformers does): such a
package is as unusable as an absent one, and its tests skip with the reason.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def require(name: str) -> ModuleType:
    """The module ``name``, or a skip naming what went wrong importing it."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure to import makes it unusable here
        pytest.skip(f"{name} is not usable here ({type(e).__name__}: {str(e)[:120]})")


def usable(name: str) -> bool:
    """Whether ``name`` imports (without skipping)."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - see require()
        return False
    return True
