"""A request's output, numbered and kept so it can be sent again.

Both ends of a worker keep one. The executor keeps the output of the cell it runs (or
ran last), so a daemon that restarts mid-cell receives it all again when the worker
reconnects. The daemon keeps the same per session, so a notebook that reconnects after
the restart, or a new kernel that attaches, gets what it missed. Each message carries its
number (``content["seq"]``); a receiver drops numbers it has seen, which makes sending
again always safe.

Memory is bounded: past ``mem_bytes`` the oldest messages move to an unlinked file (gone
with the process, whatever kills it); past ``disk_bytes`` the middle of the output is
left out and a note says how much, so the start and the latest output both survive.
Standard library only: the executor imports this inside arbitrary images.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections import deque
from typing import Iterator

from kernel_worker import protocol as P

SEQ = "seq"
_LEN = struct.Struct("<Q")
# What the output of an EXECUTE is made of, in the order a cell makes it.
JOURNALED = frozenset(
    {P.Msg.STREAM, P.Msg.DISPLAY, P.Msg.UPDATE_DISPLAY, P.Msg.CLEAR, P.Msg.RESULT, P.Msg.ERROR, P.Msg.DONE, P.Msg.NEED}
)


def size_of(msg: P.Message) -> int:
    """Roughly what ``msg`` costs to keep: its size on the wire when it was received,
    else its text, or its JSON, plus its buffers."""
    if msg.wire_bytes:
        return msg.wire_bytes
    text = msg.content.get("text") if msg.type == P.Msg.STREAM else None
    head = len(text) if isinstance(text, str) else len(json.dumps(msg.content, default=str))
    return 128 + head + sum(memoryview(b).nbytes for b in msg.buffers)


def _encode(msg: P.Message) -> bytes:
    header = json.dumps([msg.type, msg.id, msg.parent, msg.session, msg.content]).encode()
    bufs = [bytes(memoryview(b)) for b in msg.buffers]
    parts = [_LEN.pack(len(header)), header, _LEN.pack(len(bufs))]
    for b in bufs:
        parts += [_LEN.pack(len(b)), b]
    return b"".join(parts)


def _decode(data: bytes) -> P.Message:
    (n,), at = _LEN.unpack_from(data), _LEN.size
    type_, id_, parent, session, content = json.loads(data[at : at + n])
    at += n
    (count,) = _LEN.unpack_from(data, at)
    at += _LEN.size
    buffers = []
    for _ in range(count):
        (size,) = _LEN.unpack_from(data, at)
        at += _LEN.size
        buffers.append(data[at : at + size])
        at += size
    return P.Message(type_, content, session, id_, parent, buffers)


class Journal:
    def __init__(self, mem_bytes: int, disk_bytes: int, spill_dir: str = "") -> None:
        self.mem_bytes, self.disk_bytes = mem_bytes, disk_bytes
        self.spill_dir = spill_dir or None  # None: the system's temporary directory
        self.request = ""  # the id of the request whose output this is
        self.last_seq = 0
        self._mem: deque[tuple[int, P.Message, int]] = deque()
        self._mem_size = 0
        self._spilled: list[tuple[int, int, int]] = []  # (seq, offset, length) in the file
        self._file = None
        self._disk_size = 0
        self.left_out = 0  # messages dropped between the spilled start and the kept end
        self._left_out_bytes = 0
        self._gap_after = 0  # the seq after which they were dropped

    def reset(self, request: str) -> None:
        """Start keeping the output of ``request``; what was kept before is let go."""
        self.request, self.last_seq = request, 0
        self._mem.clear()
        self._mem_size = 0
        self._spilled.clear()
        self._disk_size = self.left_out = self._left_out_bytes = self._gap_after = 0
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()

    def add(self, seq: int, msg: P.Message, size: int | None = None) -> None:
        size = size_of(msg) if size is None else size
        self.last_seq = seq
        self._mem.append((seq, msg, size))
        self._mem_size += size
        while self._mem_size > self.mem_bytes and len(self._mem) > 1:
            self._spill(*self._mem.popleft())

    def _spill(self, seq: int, msg: P.Message, size: int) -> None:
        self._mem_size -= size
        if self._disk_size + size > self.disk_bytes:
            if not self.left_out:
                self._gap_after = self._spilled[-1][0] if self._spilled else 0
            self.left_out += 1
            self._left_out_bytes += size
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir, prefix="jgpu-journal-")
        data = _encode(msg)
        self._file.seek(0, os.SEEK_END)
        self._spilled.append((seq, self._file.tell(), len(data)))
        self._file.write(data)
        self._disk_size += len(data)

    def since(self, seq: int) -> Iterator[P.Message]:
        """The kept messages numbered after ``seq``, in order (a note stands for a gap)."""
        for s, offset, length in self._spilled:
            if s > seq:
                self._file.seek(offset)
                yield _decode(self._file.read(length))
        if self.left_out and self._gap_after >= seq:
            mb = self._left_out_bytes / 1e6
            text = f"\n[jupyter-gpu] {self.left_out} outputs ({mb:.1f} MB) left out here: kept output is bounded\n"
            yield P.Message(P.Msg.STREAM, {"name": "stderr", "text": text}, parent=self.request)
        for s, msg, _ in list(self._mem):
            if s > seq:
                yield msg

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
