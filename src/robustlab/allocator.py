"""glibc's malloc, tuned for a process that allocates and frees the same large buffers every step."""
from __future__ import annotations

import ctypes
import platform
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let freed tensors' memory stay in the heap for the next step instead of going back to the system.

    By default glibc serves blocks above a threshold with mmap and returns the heap's free top above another,
    and adapts both only when a block larger than any before is freed. A training step of a small model
    frees nothing that large until the first validation pass at a larger batch, so until then every step
    page-faults its activation buffers anew: a fresh process's first epoch ran 1.3–1.5× slower than its
    second (docs/results.md, "FreeAT against the clock"). Fixed thresholds end that; 32 MiB is the ceiling
    glibc's own adaptation would reach on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX). Process-wide, so the CLI
    and `build_trainer` call it, not the attacks.
    Returns whether the setting took (False off Linux or with another C library: nothing changes).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success, 0 for a value glibc refuses.
    return libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
