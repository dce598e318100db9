"""Large values as a stream of chunk messages, so every hop works at once.

ZeroMQ hands a message over only once all of it has arrived, so a 256 MiB value shipped in
one message crosses notebook -> daemon, then daemon -> worker, then is copied out, one
after the other (and CurveZMQ encrypts and decrypts it in one piece). Sent as CHUNK
messages of ``CHUNK_BYTES`` ahead of the request that uses them, the daemon relays chunk
k while chunk k+1 is still arriving, encryption overlaps decryption, and the receiver
copies each chunk straight into the value's final, writable buffer.

The request (or reply) names its streamed buffers in ``content["chunked"]``: frame index
-> size; those frames travel empty. A receiver that lacks a stream (the worker changed
between the chunks and the request) says so, and the sender sends the values again.
Standard library only, but for the protocol: the executor uses this too.
"""

from __future__ import annotations

from typing import Any

from kernel_worker import protocol as P
from kernel_worker.buffers import allocate

CHUNK_MIN = 8 * 1024 * 1024  # buffers at least this large are streamed (never bulk files)
CHUNK_BYTES = 4 * 1024 * 1024  # one chunk message's data
MOST_CHUNKS = 256  # per buffer: larger buffers get larger chunks, so a queue stays short
KEY = "chunked"


def _size(buf: Any) -> int:
    return memoryview(buf).nbytes if not hasattr(buf, "buffer") else len(buf.buffer)


def split(msg: P.Message, at_least: int = CHUNK_MIN) -> list[P.Message]:
    """The CHUNK messages to send before ``msg``, which is changed to name them (its
    large buffers replaced by empty frames). No copy: chunks are views of the buffers."""
    chunks: list[P.Message] = []
    streamed: dict[str, int] = {}
    buffers = list(msg.buffers)
    for i, buf in enumerate(buffers):
        n = _size(buf)
        if n < at_least:
            continue
        view = memoryview(buf.buffer if hasattr(buf, "buffer") else buf).cast("B")
        step = max(CHUNK_BYTES, -(-n // MOST_CHUNKS))
        for off in range(0, n, step):
            content = {"of": msg.id, "index": i, "offset": off, "size": n}
            chunks.append(
                P.Message(P.Msg.CHUNK, content, msg.session, parent=msg.parent, buffers=[view[off : off + step]])
            )
        streamed[str(i)] = n
        buffers[i] = b""
    if streamed:
        msg.content[KEY] = streamed
        msg.buffers = buffers
    return chunks


def check(msg: P.Message, most_bytes: int, most_frames: int = P.Limits.max_frames) -> str:
    """Why a received CHUNK is malformed ("" when it is not): checked before it is held,
    relayed or written anywhere."""
    c = msg.content
    of, index, offset, size = c.get("of"), c.get("index"), c.get("offset"), c.get("size")
    if not isinstance(of, str) or not P.ID_RE.match(of) or not of:
        return "a chunk names no valid message id"
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, offset, size)):
        return "a chunk's index, offset and size are integers"
    if len(msg.buffers) != 1:
        return "a chunk carries exactly one frame"
    n = _size(msg.buffers[0])
    if not (0 <= index < most_frames and 0 < size <= most_bytes and 0 <= offset and offset + n <= size and n):
        return f"a chunk out of bounds (index {index}, {n} bytes at {offset} of {size})"
    return ""


def valid_refs(chunked: Any, nframes: int, most_bytes: int) -> bool:
    """A message's ``chunked`` field: frame index -> size, each an empty frame of it."""
    if chunked is None:
        return True
    if not isinstance(chunked, dict):
        return False
    return all(
        isinstance(k, str) and k.isdigit() and int(k) < nframes
        and isinstance(v, int) and not isinstance(v, bool) and 0 < v <= most_bytes
        for k, v in chunked.items()
    )  # fmt: skip


class Assembler:
    """Receives chunks into each value's final buffer; hands them to the message that
    names them. Only the streams of the newest message are kept: a sender sends the
    chunks of one request, then the request, and an abandoned stream is dropped."""

    def __init__(self, most_bytes: int = P.Limits.max_message_bytes):
        self.most_bytes = most_bytes
        self.of = ""
        self.streams: dict[int, tuple[Any, int]] = {}  # index -> (buffer, bytes received)

    def add(self, msg: P.Message) -> None:
        """One chunk; a malformed one raises ProtocolError."""
        why = check(msg, self.most_bytes)
        if why:
            raise P.ProtocolError(P.Err.BAD_MESSAGE, why, msg.id)
        c = msg.content
        if c["of"] != self.of:
            self.of, self.streams = c["of"], {}
        buf, got = self.streams.get(c["index"]) or (allocate(c["size"]), 0)
        if len(buf) != c["size"]:
            raise P.ProtocolError(P.Err.BAD_MESSAGE, "a chunk's size differs from its stream's", msg.id)
        data = memoryview(msg.buffers[0].buffer if hasattr(msg.buffers[0], "buffer") else msg.buffers[0])
        buf[c["offset"] : c["offset"] + data.nbytes] = data
        self.streams[c["index"]] = (buf, got + data.nbytes)

    def take(self, msg: P.Message) -> list[int]:
        """Put ``msg``'s streamed buffers in place; the frame indexes it lacks (none: all
        arrived whole). What was kept for it is let go either way."""
        chunked = msg.content.get(KEY)
        streams = self.streams if self.of == msg.id else {}
        self.of, self.streams = "", {}  # a stream no message named is let go too
        if not chunked:
            return []
        if not valid_refs(chunked, len(msg.buffers), self.most_bytes):
            return list(range(len(msg.buffers)))
        missing = []
        for k, size in chunked.items():
            buf, got = streams.get(int(k)) or (None, 0)
            if buf is None or len(buf) != size or got != size:
                missing.append(int(k))
            else:
                msg.buffers[int(k)] = memoryview(buf)
        return missing
