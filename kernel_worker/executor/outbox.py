"""What a cell emits, in order: stream text batched per stream, every other message at
once behind it, from the main thread, the flusher thread and the fd pumps alike."""

from __future__ import annotations

import codecs
import fcntl
import io
import os
import select
import sys
import termios
import threading
import time
from typing import Any, Callable

from kernel_worker import protocol as P

# Text per stream message: under the daemon's 4 MiB header limit even if every character
# is escaped to 12 bytes of JSON.
STREAM_CHUNK_CHARS = 256 * 1024


class Outbox:
    """Ordered outgoing messages; consecutive writes to one stream merge into one message.

    Stream text waits up to ``flush_s`` to be batched; any other message is sent at
    once, behind the text that came before it.
    """

    def __init__(self, flush_s: float) -> None:
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._items: list = []  # [stream_name, [texts]] or Message
        self._since = 0.0  # when the oldest pending item was queued
        self._urgent = False
        self._text: list | None = None  # texts of the last item, if it is a stream's
        self._text_name: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.parent: P.Message | None = None  # the request whose output this is
        # Takes (type, content) of the running request's output instead of the cell: an
        # ipywidgets Output widget capturing it (``widgets``); True when it took it.
        self.divert: Callable[[str, dict], bool] | None = None

    def fileno(self) -> int:
        return self._wake_r

    def _queue(self, item: Any, urgent: bool) -> None:
        with self._lock:
            wake = urgent or not self._items
            if not self._items:
                self._since = time.monotonic()
            self._items.append(item)
            self._text = None if urgent else item[1]
            self._text_name = None if urgent else item[0]
            self._urgent |= urgent
        if wake:
            os.write(self._wake_w, b"x")

    def stream(self, name: str, text: str) -> None:
        if not text:
            return
        divert = self.divert
        if divert is not None and divert(P.Msg.STREAM, {"name": name, "text": text}):
            return
        with self._lock:  # the hot path of print(): append to the pending text of this stream
            if self._text_name == name:
                self._text.append(text)
                return
        self._queue([name, [text]], False)

    def send(self, msg: P.Message) -> None:
        divert = self.divert
        if divert is not None and self.parent is not None and msg.parent == self.parent.id:
            if divert(msg.type, msg.content):
                return
        self._queue(msg, True)

    def skip_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def due_in(self, idle: float) -> float:
        """Seconds until the outbox should be flushed (``idle`` when empty)."""
        with self._lock:
            if not self._items:
                return idle
            if self._urgent:
                return 0.0
            return max(0.0, self._since + self.flush_s - time.monotonic())

    def drain(self) -> list[P.Message]:
        self.skip_wake()
        with self._lock:
            items, self._items, self._urgent = self._items, [], False
            self._text = self._text_name = None
        parent = self.parent
        out = []
        for item in items:
            if isinstance(item, list):
                text = "".join(item[1]) if parent is not None else ""
                for at in range(0, len(text), STREAM_CHUNK_CHARS):  # headers are bounded: long text goes in parts
                    out.append(
                        parent.reply(P.Msg.STREAM, {"name": item[0], "text": text[at : at + STREAM_CHUNK_CHARS]})
                    )
            else:
                out.append(item)
        return out


class StreamWriter(io.TextIOBase):
    """sys.stdout / sys.stderr replacement feeding the outbox."""

    def __init__(self, name: str, outbox: Outbox):
        self.name = name
        self._outbox = outbox
        self.buffer = ByteWriter(name, outbox)  # code that writes bytes (sys.stdout.buffer.write)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._outbox.stream(self.name, text)
        return len(text)

    def fileno(self) -> int:
        return 1 if self.name == "stdout" else 2  # the captured descriptor: faulthandler, subprocess

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


class ByteWriter(io.RawIOBase):
    """``sys.stdout.buffer``: bytes decoded as UTF-8 as they come, so a character split
    across two writes arrives whole."""

    def __init__(self, name: str, outbox: Outbox):
        self.name = name
        self._outbox = outbox
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        with self._lock:
            text = self._decoder.decode(bytes(view))
        self._outbox.stream(self.name, text)
        return view.nbytes


class FdPump(threading.Thread):
    """Reads what C code and subprocesses write to one file descriptor into the cell's
    stream. ``drain`` returns once everything written before it is in the outbox, so a
    cell's reply never overtakes its own output."""

    def __init__(self, fd: int, name: str, outbox: Outbox):
        super().__init__(name=f"jgpu-fd{fd}", daemon=True)
        self.fd = fd
        self._r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        self._sink = ByteWriter(name, outbox)  # a read may end inside a character
        self._lock = threading.Lock()  # held from read to queue: drain sees all or nothing
        self._token = b"\0jgpu-drain-" + os.urandom(8).hex().encode() + b"\0"
        self._carry = b""  # the start of a token a read cut off
        self._drained = threading.Event()

    def run(self) -> None:
        while True:
            select.select([self._r], [], [])
            with self._lock:
                data = os.read(self._r, 65536)
                if not data:
                    return
                self._take(data)

    def _take(self, data: bytes) -> None:
        data, self._carry = self._carry + data, b""
        found = data.find(self._token)
        while found >= 0:
            self._sink.write(data[:found])
            data = data[found + len(self._token) :]
            self._drained.set()
            found = data.find(self._token)
        for k in range(min(len(self._token) - 1, len(data)), 0, -1):
            if self._token.startswith(data[-k:]):
                data, self._carry = data[:-k], data[-k:]
                break
        self._sink.write(data)

    def drain(self, timeout: float) -> None:
        with self._lock:
            if not self._carry and not _pending(self._r):
                return  # nothing written since the last read: the usual case, two syscalls
            self._drained.clear()
        os.write(self.fd, self._token)  # under PIPE_BUF: one atomic write, after what came before
        if not self._drained.wait(timeout):
            print(f"jupyter-gpu executor: fd {self.fd} not drained within {timeout} s", file=sys.__stderr__)


def _pending(fd: int) -> int:
    """Bytes waiting in a pipe."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def capture_fds(outbox: Outbox) -> list[FdPump]:
    """Route file-descriptor level output (C libraries, ``os.system``) into the cell's streams."""
    pumps = [FdPump(fd, name, outbox) for fd, name in ((1, "stdout"), (2, "stderr"))]
    for p in pumps:
        p.start()
    return pumps
