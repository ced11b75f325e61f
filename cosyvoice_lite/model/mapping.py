"""Which tensors live in a read-only checkpoint mapping, and how to give their pages back to the OS.

The loader maps checkpoints (mmap) so that converted layers never hold a float32 copy; the converters release
the mapped pages of each weight once its converted copy exists.
"""
from __future__ import annotations

import mmap as _mmap

import torch

from ..memory import advise_pages

_MAPPED: list = []  # (start, end) address ranges of private read-only checkpoint mappings


def register_mapping(tensors) -> None:
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
             for t in tensors if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()]
    if spans:
        _MAPPED.append((min(a for a, _ in spans), max(b for _, b in spans)))


def _in_mapping(tensor: torch.Tensor) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi in _MAPPED)


def copy_out_of_mappings(module: torch.nn.Module, keep: tuple = ()) -> int:
    """Give every parameter and buffer of `module` that still lives in a checkpoint mapping memory of its own and
    drop its mapped pages, one tensor at a time; returns the bytes copied.

    Why: with files cached in large folios (ext4 and xfs on recent kernels), touching one small mapped tensor (a
    norm's bias, an embedding row) maps the whole folio around it, including pages of weights that were converted
    and released long ago: a serving process would grow by a few hundred MB of file pages. Once nothing refers to
    a mapping any more it is unmapped. The copies cost what the unconverted tensors weigh (embedding tables, norms,
    biases). Submodules in ``keep`` (and below) stay mapped: an execution backend replaces them unread.
    """
    copies = {}
    copied = 0
    kept = {id(m) for k in keep for m in k.modules()}
    for sub in module.modules():
        if id(sub) in kept:
            continue
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is None or not _in_mapping(tensor):
                    continue
                if id(tensor) not in copies:
                    copy = tensor.detach().clone()
                    if isinstance(tensor, torch.nn.Parameter):
                        copy = torch.nn.Parameter(copy, requires_grad=False)
                    release_pages(tensor)
                    copies[id(tensor)] = copy
                    copied += tensor.numel() * tensor.element_size()
                store[name] = copies[id(tensor)]
    return copied


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor that lives in a checkpoint mapping (no-op for any other tensor).

    Only whole pages inside the tensor are dropped; the caller must not use the tensor afterwards (reading it
    again would still work: the pages come back from the file).
    """
    if _in_mapping(tensor):
        start = tensor.data_ptr()
        drop_pages(start, start + tensor.numel() * tensor.element_size())


def drop_pages(start: int, end: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages between two addresses of a read-only file mapping: the process
    stops holding them; a later read faults them in from the file."""
    if hasattr(_mmap, "MADV_DONTNEED"):
        advise_pages(start, end, _mmap.MADV_DONTNEED)


def file_mappings():
    """(start, end, permissions, file offset, path) of each of this process's mappings of a file, from
    /proc/self/maps (none where it cannot be read)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(maxsplit=5)  # the path is the rest of the line (it may hold spaces)
        if len(fields) == 6 and fields[5].startswith("/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            yield lo, hi, fields[1], int(fields[2], 16), fields[5]


def file_location(tensor: torch.Tensor):
    """(path, byte offset) of a tensor's data in the file it is mapped from, or None when it is not file-mapped."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    for lo, hi, _, offset, path in file_mappings():
        if lo <= start and end <= hi:
            return path, offset + start - lo
    return None


def clear_mappings() -> None:
    """Forget every registered mapping (called once nothing refers to them any more)."""
    _MAPPED.clear()
