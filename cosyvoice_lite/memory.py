"""Giving freed heap memory back to the OS (glibc only; a no-op elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util


def _find_malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, ...)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS. Why: synthesis allocates and frees tensors of a different size for
    every text and chunk; glibc keeps the freed memory in fragmented heaps and arenas, so without this a worker's RSS
    grows by megabytes per request (hundreds of MB over a few hundred requests) although nothing leaks. One call
    costs a few milliseconds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
