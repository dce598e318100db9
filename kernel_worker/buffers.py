"""Memory for large values arriving from elsewhere (a snapshot file, a stream of chunks),
and for the chunks on their way. Standard library only.

A received value is written into private anonymous memory just handed to the process, so
the first touch of its pages is part of every transfer, and what that costs is the
machine's, not ours:

- Transparent huge pages, where they are cheap: no zero-filling pass first (``bytearray(n)``
  writes every page twice) and 512 times fewer page faults; measured reading 256 MiB from
  the page cache, 12 GB/s, against 2 GB/s into a bytearray and 1.3 GB/s into plain
  ``mmap.mmap(-1, n)`` (shared memory, 4 KiB pages).
- Not in a VM whose balloon reports free pages to its host (virtio-balloon's free page
  reporting, as in Firecracker or QEMU VMs): the host takes back every 2 MiB block that was
  free for 2 s, so a new huge page is nearly always one the host must fault in again,
  while 4 KiB pages come first from the blocks it still backs. Measured on a 2-CPU VM, the
  first touch of a 256 MiB value: huge pages 60 ms when freed a moment ago but 400-900 ms
  otherwise, the usual case; 4 KiB pages 150-250 ms either way. (A GPU passed through to
  a VM pins its memory, so a worker's host has no such balloon.)
- Faulted in ahead of the writer by a thread of its own (Linux 5.14's
  ``MADV_POPULATE_WRITE``, outside the GIL), so the receiver's copy of each chunk finds
  its pages there and keeps up with the socket: 256 MiB shipped over loopback tcp into
  huge pages the host had taken back, 761 -> 314 ms (medians of 4, that VM, a CPU free).

Chunks queue in the daemon when one side reads slower than the other sends, and glibc's
malloc hands that memory back to the system once they are relayed, so the next value's
chunks are faulted in again: 40,000-65,000 faults per 256 MiB, measured in the daemon.
``keep_freed`` keeps it for the next value; ``give_back`` returns it when streams stop.
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import threading
from typing import Any

HUGE_PAGE = 2 * 1024 * 1024
PREFAULT_MIN = 8 * 1024 * 1024  # smaller buffers: a thread is not worth it
MADV_POPULATE_WRITE = 23  # linux/mman.h (5.14); not in Python's mmap module before 3.13
BALLOON_FEATURES = "/sys/bus/virtio/drivers/virtio_balloon/*/features"
BALLOON_F_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING: the bit in that string of 0s and 1s
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
INT_MAX = 2**31 - 1  # mallopt takes an int
MALLOC_HEAP_MOST = 32 * 1024 * 1024  # glibc's largest M_MMAP_THRESHOLD: larger chunks are mapped each time


def _libc(name: str) -> Any:
    """A libc function, called through ctypes (which lets go of the GIL), or None."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_MADVISE = _libc("madvise") if hasattr(mmap, "MADV_HUGEPAGE") else None  # Linux only
if _MADVISE is not None:
    _MADVISE.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _MADVISE.restype = ctypes.c_int


def host_takes_free_pages() -> bool:
    """Whether this machine's virtio balloon reports free pages to its host."""
    for path in glob.glob(BALLOON_FEATURES):
        try:
            with open(path) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > BALLOON_F_REPORTING and bits[BALLOON_F_REPORTING] == "1":
            return True
    return False


HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and not host_takes_free_pages()


def _populate(mem: mmap.mmap, size: int) -> None:
    """Fault ``mem``'s pages in from another thread. It only ever adds zero pages where none
    are yet, so the writer may overtake it; its buffer export keeps ``mem`` mapped until
    it is done (an abandoned value is unmapped after that)."""
    anchor: Any = ctypes.c_char.from_buffer(mem)
    addr = ctypes.addressof(anchor)

    def run() -> None:
        nonlocal anchor
        try:
            _MADVISE(addr, size, MADV_POPULATE_WRITE)  # EINVAL before Linux 5.14: then the writer faults them
        finally:
            anchor = None

    threading.Thread(target=run, name="jgpu-prefault", daemon=True).start()


def allocate(size: int) -> Any:
    """``size`` writable bytes (zeroed by the kernel as each page is first touched)."""
    if size < mmap.PAGESIZE:
        return bytearray(size)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE and HUGE_PAGES:
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # no transparent huge pages here: 4 KiB pages still work
    if size >= PREFAULT_MIN and _MADVISE is not None:
        _populate(mem, size)
    return mem


def keep_freed() -> bool:
    """Have this process's malloc (glibc's) keep the memory it frees instead of handing it
    back to the system: chunks up to MALLOC_HEAP_MOST come from its heaps, which no longer
    shrink. False where there is no such malloc."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    # Setting either turns off glibc's own sliding thresholds, so both are set.
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_HEAP_MOST)) and bool(mallopt(M_TRIM_THRESHOLD, INT_MAX))


def give_back() -> None:
    """Hand the free memory that ``keep_freed`` kept back to the system now."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)
