"""The executor's one socket to its daemon: requests in, output and heartbeats out, and
the decision to exit when the daemon is gone for good."""

from __future__ import annotations

import os
import select
import sys
import threading
import time

import zmq
import zmq.utils.monitor

from kernel_worker import protocol as P
from kernel_worker.executor.outbox import Outbox


class Channel:
    """The socket to the daemon, shared by two threads under one lock.

    Between requests the main thread holds it: it waits for the next request, sends
    heartbeats and flushes stray output itself, so a request and its reply cost no
    thread hand-off. While a request runs, the flusher thread sends batched output.
    Every send drains the outbox under the lock, which keeps messages in order.
    """

    def __init__(self, sock: zmq.Socket, signer: P.Signer, outbox: Outbox, session: str, heartbeat_s: float):
        self.sock, self.signer, self.outbox, self.session = sock, signer, outbox, session
        self.heartbeat_s = heartbeat_s
        self.lock = threading.Lock()
        self.busy = threading.Event()  # set while a request runs: the flusher's turn
        self._next_beat = time.monotonic() + heartbeat_s
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(outbox.fileno(), zmq.POLLIN)
        # The daemon going away (crash, kill -9) closes its socket. A daemon that comes back
        # within ``orphan_s`` adopts us again; otherwise nobody will ever send us work, so
        # the worker ends instead of holding its GPU forever.
        self.orphan_s = float(os.environ.get(P.Env.ORPHAN_S, "0"))
        self._lost_since: float | None = None
        self.ready_content: dict = {}
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self._poller.register(self._monitor, zmq.POLLIN)

    def send(self, msg: P.Message) -> None:
        """Send one message now. Caller holds the lock (and has flushed the outbox)."""
        self.sock.send_multipart(P.pack(msg, self.signer), copy=False)

    def flush(self) -> None:
        """Send what the outbox holds, plus a heartbeat when one is due. Caller holds the lock."""
        for msg in self.outbox.drain():
            self.send(msg)
        now = time.monotonic()
        if now >= self._next_beat:
            self.send(P.Message(P.Msg.HEARTBEAT, {}, self.session))
            self._next_beat = now + self.heartbeat_s

    def next_request(self) -> P.Message:
        """Main thread, between requests: block until the daemon sends one."""
        with self.lock:
            self.flush()
            while True:
                wait = min(self.outbox.due_in(self.heartbeat_s), max(0.0, self._next_beat - time.monotonic()))
                if self._lost_since is not None:
                    left = self._lost_since + self.orphan_s - time.monotonic()
                    if left <= 0:
                        print(
                            "jupyter-gpu executor: the daemon went away and did not come back; exiting",
                            file=sys.__stderr__,
                        )
                        os._exit(3)
                    wait = min(wait, left)
                events = dict(self._poller.poll(wait * 1000))
                if self._monitor in events:
                    event = zmq.utils.monitor.parse_monitor_message(self._monitor.recv_multipart())
                    connected = event["event"] == zmq.EVENT_CONNECTED
                    self._lost_since = None if connected else (self._lost_since or time.monotonic())
                    if connected:  # a (restarted) daemon is there: say who we are
                        self.send(P.Message(P.Msg.READY, self.ready_content, self.session))
                    continue
                if not events or self.outbox.due_in(self.heartbeat_s) == 0.0:
                    self.flush()
                    continue
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self.outbox.skip_wake()  # only the wake pipe: output not due yet
                    continue
                try:
                    _, rest = P.split_routing(frames)
                    return P.unpack(rest, self.signer, allowed=P.EXECUTOR_REQUESTS)
                except P.ProtocolError as e:
                    print(f"jupyter-gpu executor: dropped bad message: {e}", file=sys.__stderr__)

    def flusher(self) -> None:
        """Flusher thread: while a request runs, send output as it comes due."""
        while True:
            self.busy.wait()
            wait = min(self.outbox.due_in(self.heartbeat_s), max(0.0, self._next_beat - time.monotonic()))
            ready = select.select([self.outbox.fileno()], [], [], wait)[0]
            if self.outbox.due_in(self.heartbeat_s) == 0.0 or time.monotonic() >= self._next_beat:
                with self.lock:
                    self.flush()
            elif ready:
                self.outbox.skip_wake()
