"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

Every teacher forward pass, input conversion and decoded shard allocates large buffers and frees
them again; glibc's defaults return such blocks to the kernel (``mmap`` above an adaptive
threshold, ``trim`` of the heap top above 128 KiB), so the next batch faults the same pages in
again. On the CPU path that was most of the time: ``cache-logits`` with a 2-member ``cnn`` teacher
over 8,000 images spent 5.3-5.7 s of 7.1-7.7 s wall in the kernel (2.0 million page faults);
keeping freed memory made it 0.63-0.67 s of 4.2-4.5 s (0.15-0.20 million faults), at the price of
a higher resident peak (the blocks stay mapped for reuse).

:func:`keep_freed_memory` sets, through ``mallopt``: no ``mmap`` for large blocks (they come from
the heap and are reused), no trimming of the heap top, and a 512 MiB top pad; and exports the same
settings (``MALLOC_*_`` variables) to the processes this one starts (DataLoader and dask workers).
``KD_MALLOC=default`` leaves glibc as it is; a user's own ``MALLOC_*_`` variables are respected.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "KD_MALLOC"
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = {  # mallopt parameter: (its environment variable, value)
    M_MMAP_MAX: ("MALLOC_MMAP_MAX_", 0),
    M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 2**31 - 1),
    M_TOP_PAD: ("MALLOC_TOP_PAD_", 512 << 20),
}


def keep_freed_memory() -> bool:
    """Apply the settings above to this process and its children; whether they were applied.

    Not applied off Linux, under a C library without ``mallopt`` (musl), with ``KD_MALLOC=default``,
    or when the user set any ``MALLOC_*_`` variable (their choice stands).
    """
    if os.environ.get(OPT_OUT, "").lower() in ("default", "0", "off", "no"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name, _ in SETTINGS.values()):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, (_, value) in SETTINGS.items())
    if applied:
        for name, value in SETTINGS.values():
            os.environ[name] = str(value)
    return applied
