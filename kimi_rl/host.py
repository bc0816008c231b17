"""Process settings for CPU work: torch threads and the C allocator.

glibc's malloc serves blocks above a threshold (dynamic, up to 32 MiB) with fresh mmap()
pages and gives freed heap memory back to the system: a train step on CPU, which
allocates and frees activations of a few MiB to hundreds of MiB, then spends much of its
time on page faults and zeroing new pages. `tune_allocator` keeps blocks up to 256 MiB
(32 MiB where glibc refuses more) in the heap and freed memory in the process; the cost
is that the process's resident memory stays near its peak. Measured on bench/vs_trl.py's
workloads: the demo model's train step 1.3-1.5 s -> 0.8-0.9 s (32 MiB); SmolLM2-135M's
(whose 1024 x 49K lm-head tensors are 200 MB each) 10.9-13.5 s with 32 MiB, 8.4-10.8 s
with 256 MiB, in alternating pairs; peak memory +0.1-0.3 GB."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# largest first: glibc documents 32 MiB as the maximum on 64-bit; recent versions take more
MMAP_THRESHOLDS = (256 << 20, 32 << 20)


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
    if not any(mallopt(M_MMAP_THRESHOLD, t) for t in MMAP_THRESHOLDS):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def setup(num_threads: int | None) -> None:
    """torch's thread count (when given) and the allocator settings, for a run."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    tune_allocator()


def native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bfloat16 matmuls are fast here: a CUDA device with bfloat16, or a CPU whose
    flags (in `cpuinfo`) have bfloat16 instructions (AVX-512 BF16 or AMX). Elsewhere (AVX2
    CPUs) they are emulated and bfloat16 is slower than float32 (README "Precision")."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
