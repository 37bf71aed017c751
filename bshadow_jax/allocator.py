"""Host memory allocator settings for XLA:CPU work (glibc malloc), applied once at process start.

XLA:CPU allocates and frees its temporaries (activations, gradients: tens of MB) on every step, from
its worker threads. glibc gives each thread its own arena and returns freed space to the kernel
right away (large blocks are mmap'ed; arena heaps shrink), so every step maps fresh pages and
faults them in again. On the 2-core study machine that was ~23,000 page faults and ~60 ms of
kernel time per train step of the CPU study's model, about a quarter of the run
(benchmarks/allocator.py measures it). One arena, and keeping up to 1 GiB of freed memory instead
of returning it, removes almost all of that; the values computed do not change.

It must run before jax starts its thread pools (the CLI calls it first). Set BSHADOW_MALLOC=default
to leave glibc's defaults; on a C library other than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30

_applied: bool | None = None


def tune_glibc_malloc() -> bool:
    """One malloc arena, no mmap for blocks under 1 GiB, no trimming under 1 GiB free; True if applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("BSHADOW_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library is already loaded
        libc.gnu_get_libc_version  # glibc only (musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, KEEP_BYTES),
                                                 (_M_TRIM_THRESHOLD, KEEP_BYTES)))
    return _applied
