"""Keep freed tensor memory in the process instead of handing it back to the OS after every step (glibc only).

glibc's malloc serves blocks above its mmap threshold with fresh mmaps and trims the heap's free top above
its trim threshold, so on a CPU the activations of every training step (about 75 MB for the Fashion-MNIST
prior at batch 128) go back to the kernel when the step frees them and are page-faulted (and zeroed) back
in by the next one: ~10,000-22,000 minor page faults and 16-46 ms of system time per step of that prior.
PyTorch's CPU tuning guide answers this with jemalloc or tcmalloc; raising the two thresholds is the same
fix for the allocator every Linux machine already has. The process keeps its peak heap (what the next step
needs anyway) instead of returning it between steps. Imports nothing heavy; a no-op off glibc, when the
user set either threshold, when another allocator is preloaded, or with ``VQGEN_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (HEAP_MAX / 2 on 64-bit): tensors below it use the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for the next step

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set (once per process)."""
    global _done
    if _done:
        return True
    if os.environ.get("VQGEN_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # jemalloc / tcmalloc preloaded: they keep memory already
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False  # the user tuned malloc: leave it as they set it
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
