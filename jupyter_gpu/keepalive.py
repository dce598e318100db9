"""The kernel's keepalive: while this notebook has a session, a thread tells the daemon
every few seconds that the kernel is still there.

A kernel killed with SIGKILL, or a laptop that closed, sends nothing more: the daemon
then marks the session detached (a running cell keeps running, its output is kept) and
releases it after ``orphan_grace`` unless another kernel attaches. The thread has its
own socket (ZeroMQ sockets belong to one thread), made from the magic's client, and it
never blocks the kernel: a ping that cannot leave is dropped.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

from kernel_worker import protocol as P


class Keepalive(threading.Thread):
    """One thread per followed (client, session); it ends when told to follow nothing."""

    def __init__(self, interval: float):
        super().__init__(name="jupyter-gpu-keepalive", daemon=True)
        self.interval = interval
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._source: Any = None  # the magic's DaemonClient, to make ours from
        self._session = ""

    def follow(self, client: Any, session: str) -> None:
        """Ping for ``session`` through a twin of ``client`` from now on (None: stop)."""
        with self._lock:
            self._source, self._session = client, session
        self._wake.set()

    def run(self) -> None:
        source, client = None, None
        try:
            while True:
                with self._lock:
                    wanted, session = self._source, self._session
                if wanted is None:
                    return
                if wanted is not source:
                    if client is not None:
                        client.close()
                    client, source = wanted.twin(), wanted
                self._beat(client, session)
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            if client is not None:
                client.close()

    @staticmethod
    def _beat(client: Any, session: str) -> None:
        sock = client.sock
        try:
            while sock.poll(0):  # pongs to earlier beats: nothing to learn from them
                sock.recv_multipart(zmq.NOBLOCK)
            sock.send_multipart(P.pack(P.Message(P.Msg.PING, {"keepalive": True}, session), client.signer), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the daemon is away: the magic's own requests say so
