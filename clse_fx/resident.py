"""Dropping a model's memory-mapped weights from the process's resident memory.

``from_pretrained`` maps safetensors checkpoints into memory: the weights are file pages, resident once touched.
A compile's parity checks run the model, then an engine over the bundle's copy of the same weights (another
mapped file); without help both stay resident and the compile peaks at twice the weights (a 7B float16 compile
at 23 GB on a 24 GB machine). Between the two sides the model's pages are handed back to the kernel with
``madvise(MADV_PAGEOUT)``: non-destructive (a page used again is read back from the file) and applied to
file-backed mappings only, so weights held in anonymous memory (a model built in memory, cast or moved) are never
pushed to swap. Pages not yet written back (a checkpoint saved moments ago) stay. Linux 5.4+; elsewhere it
does nothing.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import mmap
import sys

from torch import nn

MADV_PAGEOUT = 21  # linux/mman-common.h; Python's mmap module names it only for its own mappings


def file_backed_ranges() -> list[tuple[int, int]]:
    """The address ranges of this process's file-backed mappings, sorted (from ``/proc/self/maps``)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                low, high = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((low, high))
    return sorted(ranges)


def page_out_weights(module: nn.Module) -> int:
    """Ask the kernel to reclaim the resident pages of ``module``'s file-mapped CPU parameters and buffers; returns
    the bytes advised (0 off Linux, on kernels without MADV_PAGEOUT, or when no weight is file-backed)."""
    if not sys.platform.startswith("linux"):
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    ranges = file_backed_ranges()
    starts = [low for low, _ in ranges]
    storages = {}
    for storage in (t.untyped_storage() for t in itertools.chain(module.parameters(), module.buffers())):
        if storage.device.type == "cpu" and storage.data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
    advised = 0
    for start, nbytes in storages.items():
        at = bisect.bisect_right(starts, start) - 1
        if at < 0 or start >= ranges[at][1]:
            continue  # anonymous memory
        low, high = ranges[at]  # pages of one mapped file: whole pages may be advised (they hold weights too)
        first = max(low, start - start % mmap.PAGESIZE)
        last = min(high, start + nbytes)
        if madvise(first, last - first, MADV_PAGEOUT) == 0:
            advised += last - first
    return advised
