"""Keep freed memory in the process for the next batch of the same large tensors.

Batch certification allocates the same large tensors over and over. glibc serves blocks
above its mmap threshold (adaptive, at most 32 MiB) with fresh mappings and unmaps them on
free, so every batch of forms or attack predictions faults its pages in again: on an offline
certificate (96 sub-boxes) that was 0.32 s of kernel time in 2.2 s per image, in the
soundness tests half their time. Raising the mmap and trim thresholds makes freed blocks
stay on the heap for the next batch. The price is that the process keeps its peak heap,
which is what a batch job about to allocate the same sizes again wants. A node frame's
certificate allocates per-segment heatmap forms since session 19: ``FramePipeline`` keeps
freed memory too (measured ~9 ms of a ~30 ms certificate faulting pages in without).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap and freed heap memory above it stays mapped.
KEEP_BYTES = 1 << 30

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc.

    Safe to call repeatedly and from any entry point (CLI, tests, benchmarks).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
    return _done
