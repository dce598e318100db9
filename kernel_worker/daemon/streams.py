"""Large values streamed as CHUNK messages (kernel_worker/chunks.py), through the daemon.

A notebook sends a value's chunks just before the request that names them. The daemon
never assembles them: a chunk for a session whose worker is idle goes on to it at once
(the relay overlaps the transfer); otherwise the chunks are held, one stream per client
socket, and travel with their request once it arrives, ahead of it, to whichever worker
serves it. A worker's chunks (a pull's values) go straight to the notebook, unjournaled:
a reply replayed after a restart names streams that are gone, and the notebook says so.

Chunks queue here whenever one side reads slower than the other sends (a notebook on
loopback outruns its worker), and the memory they took is kept for the next value while
values flow (``keep_freed_s``): handed back to the system, it was faulted in again for
each value, 40,000-65,000 page faults per 256 MiB relayed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from traitlets import Float
from traitlets.config import LoggingConfigurable

from kernel_worker import buffers, chunks
from kernel_worker import protocol as P
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon


class Streams(LoggingConfigurable):
    keep_freed_s = Float(
        60.0,
        help="Seconds the daemon keeps the memory its relayed chunks took after the last one, for the next "
        "value's, before it hands it back to the system (0: at once). Kept, the daemon's size stays at the most "
        "chunks it has held at once in that time.",
    ).tag(config=True)

    def __init__(self, daemon: WorkerDaemon, **kw: object):
        self.d = daemon
        super().__init__(parent=daemon, **kw)
        self.log = daemon.log
        # client routing id -> (the message id its chunks are for, the chunks, bytes, since)
        self.held: dict[bytes, tuple[str, list[P.Message], int, float]] = {}
        self.keeping = self.keep_freed_s > 0 and buffers.keep_freed()
        self.last_chunk = 0.0  # when one last came or went (0: memory given back since)

    def chunk(self, ident: bytes, msg: P.Message, user: str) -> None:
        """A notebook's chunk: on to the session's idle worker now, else held for its request."""
        self.last_chunk = time.monotonic()
        why = chunks.check(msg, self.d.max_message_bytes)
        if why:
            self.log.warning("dropped a chunk from a client of session %s: %s", msg.session[:40], why)
            self.held.pop(ident, None)  # its request will find the stream incomplete and ask again
            return
        s = self.d.sessions.live.get(msg.session)
        if s is not None and s.user == user and s.state == "idle" and s.client == ident:
            self.d.workers.send(s, msg)
            return
        of, held, size, since = self.held.get(ident) or ("", [], 0, time.monotonic())
        if of != msg.content["of"]:  # a new stream from this client: the old one was abandoned
            of, held, size, since = msg.content["of"], [], 0, time.monotonic()
        size += P.wire_size(msg.buffers)
        if size > self.d.max_message_bytes:
            self.log.warning("dropped a stream of session %s past max_message_bytes", msg.session[:40])
            self.held.pop(ident, None)
            return
        held.append(msg)
        self.held[ident] = (of, held, size, since)

    def claim(self, ident: bytes, msg: P.Message) -> None:
        """``msg`` arrived: the chunks held for it travel with it (``msg.ahead``)."""
        held = self.held.get(ident)
        if held is not None and held[0] == msg.id:
            del self.held[ident]
            msg.ahead = held[1]

    def send_ahead(self, s: Session, msg: P.Message) -> None:
        """What was held for ``msg``, to ``s``'s worker, before ``msg`` itself."""
        ahead, msg.ahead = msg.ahead, []
        for c in ahead:
            self.d.workers.send(s, c)

    def from_worker(self, s: Session, msg: P.Message) -> None:
        """A chunk of the reply to ``s``'s current request (Sessions.from_worker checked
        whose it is): on to the notebook."""
        self.last_chunk = time.monotonic()
        if chunks.check(msg, self.d.max_message_bytes) == "":
            msg.session = s.id
            self.d.attach.relay(s, msg)

    def expire(self, now: float) -> None:
        """Streams whose request never came (the notebook died sending them); the memory
        kept for chunks, once none came or went for ``keep_freed_s``."""
        for ident, (of, _, size, since) in list(self.held.items()):
            if now - since > self.d.client_timeout:
                del self.held[ident]
                self.log.info("dropped %d held bytes of a stream for %s: its request never came", size, of[:40])
        if self.keeping and self.last_chunk and now - self.last_chunk > self.keep_freed_s:
            self.last_chunk = 0.0
            buffers.give_back()
