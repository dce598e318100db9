"""The notebook's ZeroMQ client to a worker daemon (used by the magic, the CLI and the
server extension alike).

Blocking on purpose: it runs in the kernel's main thread, where Ctrl-C / the stop
button arrives as KeyboardInterrupt; the first one interrupts the remote cell and
keeps waiting for it to finish, a second one stops waiting.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import zmq

from kernel_worker import protocol as P


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
        self.sock.connect(url)
        self._bulk_root: str | None | bool = False  # False: not asked yet

    def close(self) -> None:
        self.sock.close(0)

    def send(self, msg: P.Message) -> None:
        try:
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
        if not self.sock.poll(timeout * 1000):
            return None
        frames = self.sock.recv_multipart(copy=False)
        try:
            _, rest = P.split_routing(frames)
            return P.unpack(rest, self.signer)
        except P.ProtocolError as e:
            raise DaemonError(e.code, f"unreadable reply from the daemon at {self.url}: {e.text}") from None

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
        interrupted = False
        while True:
            try:
                reply = self._next_reply(msg, timeout)
                if reply.type == P.Msg.FAIL:
                    raise DaemonError(reply.content.get("code", ""), reply.content.get("message", "request failed"))
                if reply.type in P.FINAL_REPLIES:
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
            else:
                wait = self.heartbeat_timeout - (now - self._ping_sent)
            if self._deadline is not None:
                wait = min(wait, self._deadline - now)
            reply = self._recv(max(wait, 0.0))
            now = time.monotonic()
            if reply is None:
                if self._ping is None:
                    self._ping = P.Message(P.Msg.PING, {}, msg.session)
                    self._ping_sent = now
                    self.send(self._ping)
                elif now - self._ping_sent >= self.heartbeat_timeout:
                    raise DaemonLost(P.Err.TIMEOUT, self._lost_text(now - self._last_heard))
                continue
            self._last_heard = now
            if self._ping is not None and reply.parent == self._ping.id:
                self._ping = None
                continue
            if reply.parent == msg.id:
                return reply
            # else: late output of an earlier request

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
