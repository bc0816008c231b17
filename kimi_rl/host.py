"""Process settings for CPU work: torch threads and the C allocator.

glibc's malloc serves blocks above a threshold (dynamic, up to 32 MiB) with fresh mmap()
pages and gives freed heap memory back to the system: a train step on CPU, which
allocates and frees activations of a few MiB to tens of MiB, then spends much of its time
on page faults and zeroing new pages (the demo model's train step on bench/vs_trl.py's
tiny workload: 1.3-1.5 s, 0.8-0.9 s with the settings below). `tune_allocator` keeps
blocks up to 32 MiB in the heap and freed memory in the process; the cost is that the
process's resident memory stays near its peak."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # the maximum glibc documents for 64-bit (newer ones take more)


def tune_allocator() -> bool:
    """Apply the settings above to this process; False where there is no glibc malloc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # e.g. musl
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def setup(num_threads: int | None) -> None:
    """torch's thread count (when given) and the allocator settings, for a run."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    tune_allocator()
