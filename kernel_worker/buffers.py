"""Writable memory for a large value arriving from elsewhere (a snapshot file, a stream of
chunks): private anonymous memory with transparent huge pages. No zero-filling pass first
(``bytearray(n)`` writes every page twice) and 512 times fewer page faults: measured
reading 256 MiB from the page cache, 12 GB/s, against 2 GB/s into a bytearray and 1.3 GB/s
into plain ``mmap.mmap(-1, n)`` (shared memory, 4 KiB pages). Standard library only."""

from __future__ import annotations

import mmap
from typing import Any

HUGE_PAGE = 2 * 1024 * 1024


def allocate(size: int) -> Any:
    """``size`` writable bytes (zeroed by the kernel as each page is first touched)."""
    if size < mmap.PAGESIZE:
        return bytearray(size)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # no transparent huge pages here: 4 KiB pages still work
    return mem
