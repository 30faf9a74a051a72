"""Hand freed heap memory back to the operating system between forward passes.

A Bonsai round runs hundreds of forward passes whose activations are freed and allocated again in slightly
different sizes (every sub-model drops other units). glibc keeps freed chunks in its heaps for reuse, and
fragmentation grows the heap from pass to pass (benchmarks/results/memory.json has the peaks). `malloc_trim(0)`
after each evaluation returns the free pages, and `cap_heap_growth` keeps a pass's large blocks out of the heap in
the first place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

# Blocks of at least this many bytes get a mapping of their own, returned to the OS when freed. glibc's default
# threshold starts at 128 KiB and rises to the largest block freed so far (up to 32 MiB); once it has risen, a
# forward pass's activations and the statistics hooks' temporaries land in the heap and fragment it, and a single
# prior pass peaked about the model's size above the same pass without hooks. Pinned at 4 MiB the large blocks stay
# mapped and the small ones in the heap: the peak comes back to the hook-free pass's at unchanged speed (a 64 KiB
# pin, tried before, slowed the shards).
MMAP_THRESHOLD_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@cache
def _libc_function(name: str):
    lib = ctypes.util.find_library("c")
    if lib is None:
        return None
    try:
        return getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):  # not glibc (musl, macOS): no such knob
        return None


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc); False where the C library has no malloc_trim."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def cap_heap_growth() -> bool:
    """Pin glibc's mmap threshold (MMAP_THRESHOLD_BYTES) for this process; False where that cannot be done."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
