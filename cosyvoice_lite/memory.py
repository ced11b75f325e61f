"""A model worker's process-wide runtime settings: threads, oneDNN's cache, and keeping resident memory near what
is used (glibc malloc settings and trimming, no-ops elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os


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

    Why: glibc raises this threshold by itself once a large block is freed, so from then on HiFT's large
    activations come from the heap, where freed space stays resident and fragmented, and a worker's memory keeps
    growing. Smaller blocks (the flow's and the LLM's) stay in the heap, where reusing memory is cheaper than
    faulting in fresh pages (a lower threshold made the flow slower). Returns False where this is not glibc.
    """
    return _MALLOPT is not None and _MALLOPT(M_MMAP_THRESHOLD, int(threshold)) == 1


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS. Why: synthesis allocates and frees tensors of a different size for
    every text and chunk; glibc keeps the freed memory in fragmented heaps and arenas, so without this a worker's RSS
    grows by megabytes per request (hundreds of MB over a few hundred requests) although nothing leaks. One call
    costs a few milliseconds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_LIBC = None


def advise_pages(start: int, end: int, advice: int) -> None:
    """madvise(advice) the whole pages between two addresses (the pages partly outside are left alone)."""
    global _LIBC
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice)


def lazy_empty(shape, dtype):
    """An uninitialised tensor whose memory becomes resident only where it is written. Why: room reserved for data
    that grows (a sequence's keys and values) then costs what is filled, and growing needs no copy, which for a
    moment held the data twice. Large blocks are mappings of their own (map_large_blocks), whose untouched pages
    are not resident; transparent huge pages are refused for them, since one written row would make 2 MB
    resident."""
    import torch

    tensor = torch.empty(shape, dtype=dtype)
    size = tensor.numel() * tensor.element_size()
    if hasattr(mmap, "MADV_NOHUGEPAGE") and size >= LARGE_BLOCK:  # smaller ones share the heap's pages
        advise_pages(tensor.data_ptr(), tensor.data_ptr() + size, mmap.MADV_NOHUGEPAGE)
    return tensor


def discard(tensor) -> None:
    """Give back the whole pages inside a contiguous tensor's memory, whose values are no longer needed: they read
    as zeros when next touched."""
    if hasattr(mmap, "MADV_DONTNEED") and tensor.numel():
        assert tensor.is_contiguous()
        advise_pages(tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size(), mmap.MADV_DONTNEED)


_OMP_PAUSE = None  # omp_pause_resource_all of the OpenMP runtime torch loaded (looked up once), False: none


def _omp_pause():
    global _OMP_PAUSE
    if _OMP_PAUSE is None:
        _OMP_PAUSE = False
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "/lib" in line and ".so" in line}
        except OSError:
            paths = set()
        for path in sorted(paths):
            name = os.path.basename(path)
            if name.startswith(("libgomp", "libiomp", "libomp")):
                try:
                    function = ctypes.CDLL(path).omp_pause_resource_all  # OpenMP 5.0
                except (OSError, AttributeError):
                    continue
                function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
                _OMP_PAUSE = function
                break
    return _OMP_PAUSE


def release_compute_threads() -> None:
    """Let go of the OpenMP worker threads this thread started (torch starts them at its first parallel op).

    Why: with more OpenMP threads alive than CPUs, GNU OpenMP stops spinning between parallel regions and sleeps
    instead, which doubles the cost of an LLM step (hundreds of small parallel ops). A thread that loaded the model
    or ran some torch work and will not run more calls this, so that only the synthesis thread's pool exists; its
    next parallel op, if any, starts a pool again. A no-op without an OpenMP 5 runtime."""
    pause = _omp_pause()
    if pause:
        pause(1)  # omp_pause_soft: the threads end, the runtime stays usable


def configure_process(threads: int | None = None) -> None:
    """The process-wide runtime knobs of a worker that runs the model, in one place: CPU threads, oneDNN's kernel
    cache, and large blocks in mappings of their own."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    # oneDNN keeps compiled kernels for every convolution shape it has seen (1024 by default); streamed chunks come
    # in many lengths, so a long-running worker would keep growing.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    map_large_blocks()
