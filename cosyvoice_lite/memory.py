"""Keeping a worker's resident memory near what it uses: glibc malloc settings and trimming (no-ops elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util


def _glibc(name: str, argtypes: list):
    """A glibc malloc function, or None (musl, macOS, ...)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


_MALLOC_TRIM = _glibc("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
LARGE_BLOCK = 8 * 2 ** 20


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Serve every allocation of `threshold` bytes or more from a mapping of its own, unmapped when freed.

    Why: glibc raises this threshold by itself (up to 32 MB) once a large block is freed, so from then on HiFT's
    10-50 MB activations come from the heap, where freed space stays resident, fragmented: one 10 s stream took
    a default-mode worker from ~1.2 to ~1.8 GB. Smaller blocks (the flow's and the LLM's, even for a 10 s segment
    at once) stay in the heap, where reusing memory is cheaper than faulting in fresh pages: with 4 MB the flow of
    a 10 s segment ran ~14% slower, with 1 MB streaming did. Returns False where this is not glibc.
    """
    return _MALLOPT is not None and _MALLOPT(M_MMAP_THRESHOLD, int(threshold)) == 1


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS. Why: synthesis allocates and frees tensors of a different size for
    every text and chunk; glibc keeps the freed memory in fragmented heaps and arenas, so without this a worker's RSS
    grows by megabytes per request (hundreds of MB over a few hundred requests) although nothing leaks. One call
    costs a few milliseconds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
