"""The executor's one socket to its daemon: requests in, output and heartbeats out, the
running cell's output kept until it has surely arrived, and the decision to exit when
the daemon is gone for good."""

from __future__ import annotations

import os
import select
import shutil
import sys
import tempfile
import threading
import time

import zmq
import zmq.utils.monitor

from kernel_worker import chunks, filestream
from kernel_worker import protocol as P
from kernel_worker.executor.outbox import Outbox
from kernel_worker.journal import JOURNALED, SEQ, Journal

JOURNAL_MEM_BYTES = 16 * 1024**2  # a cell's output kept in memory; the rest goes to a file
JOURNAL_DISK_BYTES = 1024**3  # and at most this much in the file
AGAIN = "again"  # on output sent again: the connection it went out on
CHUNK_SEND_S = 30.0  # how long one chunk of a value sent back may wait for the daemon to take it
CHUNK_POLL_MS = 100
MOST_RECEIVED_BYTES = 1024**4  # a snapshot's files from the daemon, which bounds them by its quota


class Channel:
    """The socket to the daemon, shared by two threads under one lock.

    Between requests the main thread holds it: it waits for the next request, sends
    heartbeats and flushes stray output itself, so a request and its reply cost no
    thread hand-off. While a request runs, the flusher thread sends batched output.
    Every send drains the outbox under the lock, which keeps messages in order.

    A cell's output is numbered and journaled as it is sent. Output never waits on the
    daemon: while it is away (killed, restarting) or not reading, output goes only to the
    journal, and whatever it did not take is sent again once it can; a daemon that
    (re)connects gets READY, naming the cell, and the whole journal (it drops numbers it
    has seen), so a cell running across a daemon restart loses nothing.
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
        self.journal = Journal(JOURNAL_MEM_BYTES, JOURNAL_DISK_BYTES)
        self.assembler = chunks.Assembler()  # values streamed to us ahead of their request
        self.incoming: filestream.Receiver | None = None  # a snapshot's files, ahead of its RESTORE
        self.incoming_error = ""
        self._scratch = ""
        self._seq = 0
        self._unsent = 0  # the first journaled seq ZeroMQ did not take (0: none)
        self._cell_started = 0.0
        self._cell_done = True
        self._connects = 0
        self.on_connect = None  # () -> a message to send on each (re)connect, after READY (the mirror's)

    # ------------------------------------------------------------------ sending (caller holds the lock)

    def begin(self, msg: P.Message) -> None:
        """A new request: an EXECUTE's output is journaled from now on."""
        if msg.type == P.Msg.EXECUTE:
            self.journal.reset(msg.id)
            self._seq = self._unsent = 0
            self._cell_started, self._cell_done = time.monotonic(), False

    def send(self, msg: P.Message) -> None:
        """Send one message now, or keep it for when the daemon can take it."""
        if msg.type in JOURNALED and msg.parent == self.journal.request:
            self._seq += 1
            msg.content[SEQ] = self._seq
            frames = P.pack(msg, self.signer)  # once: its size is what the journal counts
            self.journal.add(self._seq, msg, P.wire_size(frames))
            self._cell_done |= msg.type in (P.Msg.DONE, P.Msg.NEED)
            if self._unsent or not self._offer(msg, frames):
                self._unsent = self._unsent or self._seq
            return
        if msg.type == P.Msg.HEARTBEAT:
            self._offer(msg)  # a beat that cannot leave now is not worth keeping
            return
        self.sock.send_multipart(P.pack(msg, self.signer), copy=False)

    def send_streamed(self, msg: P.Message) -> None:
        """``msg`` with its large buffers sent ahead as chunks (a pull's values). With the
        daemon gone, the reply names streams that never left, and the notebook says so,
        rather than the worker hanging here."""
        self.push(chunks.split(msg))
        self.send(msg)

    def push(self, msgs: list[P.Message]) -> bool:
        """Send ``msgs`` in order (a value's chunks, a snapshot's files), each given up to
        ``CHUNK_SEND_S`` to leave; False once one could not."""
        for m in msgs:
            frames, deadline = P.pack(m, self.signer), time.monotonic() + CHUNK_SEND_S
            while not self._offer(m, frames):
                if time.monotonic() > deadline:
                    return False
                self.sock.poll(CHUNK_POLL_MS, zmq.POLLOUT)
        return True

    def _offer(self, msg: P.Message, frames: list | None = None) -> bool:
        """Hand ``msg`` (packed as ``frames``, if it is) to ZeroMQ unless the daemon is away
        or not reading."""
        if self._lost_since is not None:
            return False
        try:
            self.sock.send_multipart(frames or P.pack(msg, self.signer), zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _send_again(self, after: int) -> None:
        """Journaled output numbered after ``after``, for as long as ZeroMQ takes it."""
        self._unsent = 0
        for msg in self.journal.since(after):
            seq = msg.content.get(SEQ, after)
            # A copy may still sit in ZeroMQ's queue from before the daemon went: this one
            # must not look like a replay of it (a daemon drops those unread).
            msg.content[AGAIN] = self._connects
            if not self._offer(msg):
                self._unsent = max(seq, 1)
                return
            after = seq

    def flush(self) -> None:
        """Send what the outbox holds, plus a heartbeat when one is due."""
        self._take_events()
        if self._unsent and self._lost_since is None:
            self._send_again(self._unsent - 1)
        for msg in self.outbox.drain():
            self.send(msg)
        now = time.monotonic()
        if now >= self._next_beat:
            self.send(P.Message(P.Msg.HEARTBEAT, {}, self.session))
            self._next_beat = now + self.heartbeat_s

    def _take_events(self) -> None:
        """Connection events: a daemon gone, or one (again) there, which is told who we
        are and what we ran, and gets the journal."""
        while True:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = zmq.utils.monitor.parse_monitor_message(frames)
            if event["event"] != zmq.EVENT_CONNECTED:
                self._lost_since = self._lost_since or time.monotonic()
                continue
            self._lost_since = None
            self._connects += 1
            content = dict(self.ready_content)
            if self.journal.request:
                content["running"] = {
                    "id": self.journal.request,
                    "done": self._cell_done,
                    "elapsed_s": time.monotonic() - self._cell_started,
                }
            self.sock.send_multipart(P.pack(P.Message(P.Msg.READY, content, self.session), self.signer), copy=False)
            again = self.on_connect() if self.on_connect is not None else None
            if again is not None:  # before the output: the cell's reply waits for it there
                self._offer(again)
            self._send_again(0)

    @property
    def connects(self) -> int:
        """How many times the daemon's socket has (re)connected."""
        return self._connects

    # ------------------------------------------------------------------ threads

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
                        self.remove_scratch()
                        os._exit(3)
                    wait = min(wait, left)
                events = dict(self._poller.poll(wait * 1000))
                if self._monitor in events:
                    self._take_events()
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
                    msg = P.unpack(rest, self.signer, allowed=P.EXECUTOR_REQUESTS)
                except P.ProtocolError as e:
                    print(f"jupyter-gpu executor: dropped bad message: {e}", file=sys.__stderr__)
                    continue
                if msg.type == P.Msg.MIRROR:  # a second answer to a workspace question already answered
                    continue
                if msg.type == P.Msg.FILE:  # part of a snapshot the next request restores
                    self._file_piece(msg)
                    continue
                if msg.type == P.Msg.CHUNK:  # part of a value the next request names
                    try:
                        self.assembler.add(msg)
                    except P.ProtocolError as e:
                        print(f"jupyter-gpu executor: dropped bad chunk: {e}", file=sys.__stderr__)
                    continue
                if msg.type in (P.Msg.EXECUTE, P.Msg.PULL):
                    msg.content["lost_streams"] = self.assembler.take(msg)
                self.begin(msg)
                return msg

    def _file_piece(self, msg: P.Message) -> None:
        """Into a fresh directory per stream; a stream abandoned for a newer one is removed."""
        of = msg.content.get("of")
        if self.incoming is None or self.incoming.of != of:
            if self.incoming is not None:
                self.incoming.close()
                shutil.rmtree(self.incoming.directory, ignore_errors=True)
            where = tempfile.mkdtemp(prefix="restore-", dir=self.scratch())
            self.incoming, self.incoming_error = filestream.Receiver(where, str(of), MOST_RECEIVED_BYTES), ""
        if self.incoming_error:
            return
        try:
            self.incoming.add(msg)
        except (filestream.FileStreamError, OSError) as e:  # a full disk on this node: the RESTORE says so
            self.incoming_error = str(e)

    def scratch(self) -> str:
        """This worker's own directory on its node (made at first use, removed at its end)."""
        if not self._scratch:
            self._scratch = tempfile.mkdtemp(prefix=f"jupyter-gpu-{self.session}-")
        return self._scratch

    def remove_scratch(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def answer_to(self, question: P.Message, timeout: float, kind: str = P.Msg.INPUT_REPLY) -> P.Message | None:
        """Main thread, inside a running cell: the daemon's answer to ``question`` (an input
        request, a workspace mirror), or None after ``timeout``. The lock is held only while
        reading."""
        with self.lock:
            if not self.sock.poll(timeout * 1000):
                return None
            frames = self.sock.recv_multipart(copy=False)
        try:
            _, rest = P.split_routing(frames)
            msg = P.unpack(rest, self.signer, allowed=P.EXECUTOR_REQUESTS)
        except P.ProtocolError as e:
            print(f"jupyter-gpu executor: dropped bad message: {e}", file=sys.__stderr__)
            return None
        if msg.type == kind and msg.parent == question.id:
            return msg
        print(
            f"jupyter-gpu executor: dropped a {msg.type} that came while a cell waited for {kind}", file=sys.__stderr__
        )
        return None

    def flusher(self) -> None:
        """Flusher thread: while a request runs, send output as it comes due, and answer
        a daemon that comes back (the monitor's descriptor wakes us)."""
        monitor_fd = self._monitor.getsockopt(zmq.FD)
        while True:
            self.busy.wait()
            wait = min(self.outbox.due_in(self.heartbeat_s), max(0.0, self._next_beat - time.monotonic()))
            ready = select.select([self.outbox.fileno(), monitor_fd], [], [], wait)[0]
            if (
                monitor_fd in ready
                or self.outbox.due_in(self.heartbeat_s) == 0.0
                or time.monotonic() >= self._next_beat
            ):
                with self.lock:
                    self.flush()
            elif ready:
                self.outbox.skip_wake()
