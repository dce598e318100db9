"""Bulk buffers through shared memory, for peers on the same host.

A naive relay (client -> daemon -> executor over ZeroMQ) copies every byte twice
through kernel socket buffers and faults in fresh pages on each hop: here it moves
256 MB at 0.3-0.45 GB/s. When the notebook and the worker share a host, a large
buffer is instead written once into a file in the session's bulk directory on a
tmpfs, and the receiver maps it copy-on-write: one copy in total, and the mapped
value is writable. The daemon only passes the file's name along (it checks the
name, never the content). Standard library only: the executor uses this too.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Buffers at least this large go through a bulk file when the peer shares the host.
BULK_MIN = 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# os.pwrite releases the GIL: a couple of writers fill tmpfs pages in parallel.
_WRITE_CHUNK = 64 * 1024 * 1024
_writers = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="jgpu-bulk")


def valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME_RE.match(name))


def _write(path: str, buf: memoryview) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, buf.nbytes)

        def chunk(off: int) -> None:
            view = buf[off : off + _WRITE_CHUNK]
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], off + done)

        list(_writers.map(chunk, range(0, buf.nbytes, _WRITE_CHUNK)))
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def offload(frames: list, directory: str, first: int = 0) -> tuple[list, dict]:
    """Move large frames (index >= ``first``) into files in ``directory``.

    Returns the frames with each moved one replaced by b"" and ``{index: {file, size}}``.
    """
    out, moved = list(frames), {}
    for i in range(first, len(frames)):
        buf = memoryview(frames[i]).cast("B")
        if buf.nbytes < BULK_MIN:
            continue
        name = uuid.uuid4().hex
        _write(os.path.join(directory, name), buf)
        out[i] = b""
        moved[str(i)] = {"file": name, "size": buf.nbytes}
    return out, moved


def restore(frames: list, moved: dict, directory: str) -> list:
    """Map offloaded frames back in (copy-on-write) and remove their files."""
    out = list(frames)
    try:
        for key, ref in moved.items():
            name, size = ref["file"], int(ref["size"])
            if not valid_name(name):
                raise ValueError(f"bad bulk file name {name!r}")
            path = os.path.join(directory, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size != size:
                    raise ValueError(f"bulk file {name} is not {size} bytes")
                out[int(key)] = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
            finally:
                os.close(fd)
                os.unlink(path)
    finally:
        discard(moved, directory)
    return out


def discard(moved: dict, directory: str) -> None:
    """Remove bulk files that will not be read (a request refused, a worker gone)."""
    for ref in moved.values():
        name = ref.get("file") if isinstance(ref, dict) else None
        if valid_name(name):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def valid_refs(moved: Any, nframes: int) -> bool:
    """A request's ``bulk`` field: frame index -> a file of this session's bulk directory."""
    if not isinstance(moved, dict):
        return False
    for k, ref in moved.items():
        if not (k.isdigit() and int(k) < nframes and isinstance(ref, dict)):
            return False
        if not valid_name(ref.get("file")) or not isinstance(ref.get("size"), int):
            return False
    return True
