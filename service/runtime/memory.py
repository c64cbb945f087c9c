"""Giving the memory freed after a burst back to the operating system.

A burst of explanations allocates large activations and gradients on every lane at once; when they are freed, glibc
keeps them in its per-thread arenas (and torch's CPU allocator returns to malloc, which holds on to the pages), so the
server's RSS stays at the burst's peak. `trim_memory` calls glibc's `malloc_trim(0)`, which releases the free pages
of every arena; the lanes call it (`DeviceLanes`) when a long batch ends and no other lane is busy. Where the C
library has no `malloc_trim` (musl, macOS, Windows) it does nothing. `MALLOC_ARENA_MAX=2` in the environment bounds
the number of arenas as well (README, "Batching"). `SALIENCY_MALLOC_TRIM=0` turns the trimming off (to measure it:
`python -m benchmarks.memory_burst`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library lacks it."""
    if not sys.platform.startswith("linux") or os.environ.get("SALIENCY_MALLOC_TRIM", "1") == "0":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already uses
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def can_trim() -> bool:
    return _MALLOC_TRIM is not None


def trim_memory() -> bool:
    """Return the C heap's free pages to the operating system; False where that is not possible (no glibc)."""
    if _MALLOC_TRIM is None:
        return False
    try:
        _MALLOC_TRIM(0)
    except Exception:  # noqa: BLE001 - trimming is an optimisation, never a failure of the work
        log.debug("malloc_trim failed", exc_info=True)
        return False
    return True
