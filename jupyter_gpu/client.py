"""The notebook's ZeroMQ client to a worker daemon (used by the magic, the CLI and the
server extension alike).

Blocking on purpose: it runs in the kernel's main thread, where Ctrl-C / the stop
button arrives as KeyboardInterrupt; the first one interrupts the remote cell and
keeps waiting for it to finish, a second one stops waiting.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Callable

import zmq

from kernel_worker import chunks
from kernel_worker import protocol as P
from kernel_worker.journal import SEQ

# Requests whose answer may take long: a ping during one asks whether it is still coming.
TRACKED = frozenset({P.Msg.EXECUTE, P.Msg.PULL, P.Msg.ATTACH})


class DaemonError(Exception):
    """The daemon refused or could not serve a request. ``code`` is a ``protocol.Err``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class DaemonLost(DaemonError):
    """No answer from the daemon, even to a ping."""


class DaemonClient:
    def __init__(
        self,
        url: str,
        key: bytes,
        heartbeat_interval: float = 5.0,
        heartbeat_timeout: float = 10.0,
        context: zmq.Context | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ):
        """``curve``: (server public, client public, client secret) z85 keys for a daemon
        that uses CurveZMQ; ``key`` is then unused (the client's public key signs)."""
        self.url = url
        self._made_with = (url, key, heartbeat_interval, heartbeat_timeout, curve)
        self.signer = P.Signer(curve[1] if curve else key)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndtimeo = int(heartbeat_timeout * 1000)  # a send that cannot go anywhere fails
        self._curve = curve is not None
        if curve:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        # A fixed routing id, unguessable: a restarted daemon (which keeps it in the session's
        # record) sends a running cell's output to this client as soon as its worker is back.
        self.sock.identity = b"c" + uuid.uuid4().hex.encode()
        self.sock.connect(url)
        self._bulk_root: str | None | bool = False  # False: not asked yet
        self._assembler = chunks.Assembler()  # values streamed back to this client
        self.incarnation = ""  # the daemon's, from its last pong

    def twin(self) -> "DaemonClient":
        """Another client to the same daemon (its own socket, for another thread)."""
        url, key, interval, timeout, curve = self._made_with
        return DaemonClient(url, key, interval, timeout, curve=curve)

    def close(self) -> None:
        self.sock.close(0)

    def send(self, msg: P.Message) -> None:
        """Send ``msg``; its large buffers go first, as a stream of chunks (chunks.py)."""
        try:
            for c in chunks.split(msg):
                self.sock.send_multipart(P.pack(c, self.signer), copy=False)
            self.sock.send_multipart(P.pack(msg, self.signer), copy=False)
        except zmq.Again:  # no connection could be made (sndtimeo): a refused CURVE handshake, say
            raise DaemonLost(P.Err.TIMEOUT, self._lost_text(self.heartbeat_timeout)) from None

    def _lost_text(self, silent_s: float) -> str:
        return (
            f"lost contact with the jupyter-gpu daemon at {self.url}: no answer for {silent_s:.0f} s. "
            "The remote cell may still be running; check `%gpu status` once the daemon is back"
            + (" (or your CURVE key is not authorised there)." if self._curve else ".")
        )

    def _recv(self, timeout: float) -> P.Message | None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
                return None
            frames = self.sock.recv_multipart(copy=False)
            try:
                _, rest = P.split_routing(frames)
                return P.unpack(rest, self.signer)
            except P.ProtocolError as e:
                if e.code != P.Err.REPLAYED:
                    raise DaemonError(e.code, f"unreadable reply from the daemon at {self.url}: {e.text}") from None
                # Output the daemon sent again after a reconnect, already had: the guard's job done.

    def request(
        self,
        msg: P.Message,
        on_message: Callable[[P.Message], None] | None = None,
        on_interrupt: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> P.Message:
        """Send ``msg`` and return its final reply; intermediate replies go to ``on_message``.

        Silence longer than ``heartbeat_interval`` is answered with a ping; no pong
        within ``heartbeat_timeout`` raises DaemonLost. A FAIL reply raises DaemonError.
        """
        self.send(msg)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._last_heard = time.monotonic()
        self._ping: P.Message | None = None
        self._seen = 0  # the last numbered output of this request we have (a replay resends some)
        interrupted = False
        while True:
            try:
                reply = self._next_reply(msg, timeout)
                seq = reply.content.get(SEQ)
                if isinstance(seq, int):
                    if seq <= self._seen:
                        continue
                    self._seen = seq
                if reply.type == P.Msg.CHUNK:  # part of a value the final reply names
                    self._assembler.add(reply)
                    continue
                if reply.type == P.Msg.FAIL:
                    raise DaemonError(reply.content.get("code", ""), reply.content.get("message", "request failed"))
                if reply.type in P.FINAL_REPLIES:
                    if self._assembler.take(reply):
                        raise DaemonError(
                            P.Err.BAD_MESSAGE,
                            "a value sent back by the worker did not arrive whole (its daemon restarted while it was "
                            "being sent?): pull it again with %gpu pull NAME",
                        )
                    if reply.type == P.Msg.WELCOME:
                        self.incarnation = str(reply.content.get("incarnation") or "")
                    return reply
                if on_message is not None:
                    on_message(reply)
            except KeyboardInterrupt:
                # Wherever Ctrl-C lands in this loop, the first one goes to the remote cell.
                if interrupted or on_interrupt is None:
                    raise
                interrupted = True
                on_interrupt()

    def _next_reply(self, msg: P.Message, timeout: float | None) -> P.Message:
        """The next reply to ``msg``, pinging the daemon through silences."""
        while True:
            now = time.monotonic()
            if self._deadline is not None and now > self._deadline:
                raise DaemonLost(
                    P.Err.TIMEOUT, f"no reply to {msg.type} from the daemon at {self.url} in {timeout:g} s"
                )
            if self._ping is None:
                wait = self.heartbeat_interval
            else:  # until the first ping's answer is overdue, or the next ping is due
                wait = min(
                    self.heartbeat_timeout - (now - self._ping_sent), self.heartbeat_interval - (now - self._ping_last)
                )
            if self._deadline is not None:
                wait = min(wait, self._deadline - now)
            reply = self._recv(max(wait, 0.0))
            now = time.monotonic()
            if reply is None:
                if self._ping is None:
                    self._send_ping(msg, now)
                elif now - self._ping_sent >= self.heartbeat_timeout:
                    raise DaemonLost(P.Err.TIMEOUT, self._lost_text(now - self._last_heard))
                elif now - self._ping_last >= self.heartbeat_interval:  # it may have gone with a broken connection
                    self._send_ping(msg, now, again=True)
                continue
            self._last_heard = now
            if self._ping is not None and reply.parent in self._pinged:
                self._ping = None
                self._pong(msg, reply.content)
                continue
            if reply.parent == msg.id:
                return reply
            # else: late output of an earlier request, or the answer to an earlier ping

    def _send_ping(self, msg: P.Message, now: float, again: bool = False) -> None:
        """Ask whether the daemon is there, and for a tracked request whether it is still
        coming; the daemon sends what we missed of it first. ``again``: while the first is
        unanswered (a ping written into a connection that then broke, to a daemon stopped
        and killed, is gone; a restarted daemon never sees it): any answer will do, and the
        daemon counts as lost ``heartbeat_timeout`` after the first."""
        content = {"request": msg.id, "seen": self._seen} if msg.type in TRACKED else {}
        ping = P.Message(P.Msg.PING, content, msg.session)
        if not again:
            self._ping, self._ping_sent, self._pinged = ping, now, set()
        self._pinged.add(ping.id)
        self._ping_last = now
        self.send(ping)

    def _pong(self, msg: P.Message, content: dict) -> None:
        """A request the daemon no longer knows will never be answered: say so now."""
        incarnation = str(content.get("incarnation") or "")
        restarted = bool(self.incarnation) and incarnation != self.incarnation
        self.incarnation = incarnation or self.incarnation
        if content.get("known") is False or (restarted and msg.type not in TRACKED):
            # An untracked request (a snapshot, a status) died with the daemon that had it.
            why = str(content.get("why") or "it does not know this request")
            what = "restarted and" if restarted else "no longer knows this request and"
            raise DaemonError(
                P.Err.RESTARTED,
                f"the jupyter-gpu daemon at {self.url} {what} will not answer this {msg.type}: {why[:200]}. "
                "Output after this point is lost; the remote cell may or may not have finished. "
                "Run it again (`%gpu status` shows the session)",
            )

    def call(self, type: str, content: dict | None = None, session: str = "", timeout: float = 30.0) -> dict:
        """A simple request/reply (status, cost, release, hello); returns the reply content."""
        return self.request(P.Message(type, content or {}, session), timeout=timeout).content

    def bulk_root(self) -> str | None:
        """The daemon's bulk directory if this process can use it (same host), else None."""
        if self._bulk_root is False:
            info = self.call(P.Msg.HELLO)
            root, probe = info.get("bulk_root"), info.get("bulk_probe")
            self._bulk_root = None
            try:
                with open(os.path.join(root, ".probe")) as f:
                    if f.read() == probe:
                        self._bulk_root = root
            except (OSError, TypeError):
                pass
        return self._bulk_root or None
