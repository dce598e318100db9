"""The Slurm gateway the notebook-level Slurm tests share: the one-node cluster of
tests/support/slurm.py (one per test module) and ``gateway``, a daemon with the slurm
backend in front of it; after each test Slurm's queue holds none of its jobs."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import select
import socket
import struct
import termios
import threading

import pytest

from support.daemons import start_daemon
from support.orphans import forget_daemon
from support.slurm import slurm_cluster

POLL_S = 0.2


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm-backend")) as cluster:
        yield cluster


@pytest.fixture
def gateway(slurm, tmp_path, runtime_dir, monkeypatch):
    """``start(*options)``: a daemon with the slurm backend (the login node's gateway);
    stopped afterwards, and then Slurm's queue holds none of its jobs."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    started = []

    def start(*options: str, prefix: tuple[str, ...] = ()):
        d = start_daemon(
            tmp_path,
            "--backend=slurm",
            "--SlurmBackend.partition=gpu",
            f"--SlurmBackend.poll_interval={POLL_S}",
            "--SlurmBackend.gres_types={'H100': 'h100', 'A100': 'a100'}",
            "--WorkerDaemon.worker_heartbeat_interval=0.5",
            *options,
            prefix=prefix,
        )
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    forget_daemon(str(tmp_path / "daemon.json"))
    left = our_jobs(slurm)
    assert not left, f"jobs left behind: {left}"
    others = [j["id"] for j in slurm.queue()]
    if others:
        slurm.scancel(*others)
    slurm.wait_for("an empty queue", lambda: not slurm.queue())


def our_jobs(slurm) -> list[dict]:
    """The gateway's jobs: named ``jgpu-...`` and submitted by this test's user (another
    user may name a job like ours)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    return [j for j in slurm.queue() if j["name"].startswith("jgpu-") and j["user"] == me]


def running_job(slurm) -> dict:
    def running() -> list[dict]:
        return [j for j in our_jobs(slurm) if j["state"] == "RUNNING"]

    return slurm.wait_for("a running jgpu job", running)[0]


class Splice:
    """A cut the test controls in the notebook's connection to its gateway: a unix socket
    relaying bytes both ways to the daemon's ipc socket, counting them. ``hold(way, n)``
    lets ``n`` more bytes through that way (``"up"``: notebook to daemon, ``"down"``: back)
    and then no more, setting ``held``; when either end goes (the daemon killed), the
    connection is closed whole, and what it held is lost, as on a network. Notebooks reach
    it through ``connection_file(daemon)``, a copy of the daemon's with its address."""

    BUF = 1 << 20

    def __init__(self, directory, target_url: str):
        self.path = os.path.join(str(directory), "splice.sock")
        self.target = target_url.removeprefix("ipc://")
        self.moved = {"up": 0, "down": 0}  # bytes read from one end, to go to the other
        self.limit: dict[str, int | None] = {"up": None, "down": None}
        self.held = threading.Event()
        self._pairs: list[dict] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._wake_r, self._wake_w = os.pipe()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"ipc://{self.path}"

    def connection_file(self, daemon) -> str:
        """A copy of ``daemon``'s connection file naming this splice as its address."""
        info = json.loads(open(daemon.connection_file).read())
        info["url"] = self.url
        path = os.path.join(os.path.dirname(self.path), "spliced.json")
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)
        return path

    def hold(self, way: str, after: int) -> None:
        self.held.clear()
        self.limit[way] = self.moved[way] + after
        self._wake()

    def release(self) -> None:
        self.limit = {"up": None, "down": None}
        self.held.clear()
        self._wake()

    def unread_upstream(self) -> int:
        """Bytes relayed towards the daemon that it has not read yet (TIOCOUTQ on a unix
        socket counts what the peer has not taken)."""
        unread = 0
        for p in list(self._pairs):
            try:
                queued = fcntl.ioctl(p["up"], termios.TIOCOUTQ, b"\0" * 4)
            except OSError:  # closed meanwhile: nothing of it will be read
                continue
            unread += len(p["pending"]["up"]) + struct.unpack("i", queued)[0]
        return unread

    def close(self) -> None:
        self._closing = True
        self._wake()
        self._thread.join(10)
        for p in self._pairs:
            self._drop(p)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        os.write(self._wake_w, b"x")

    def _room(self, way: str) -> int:
        limit = self.limit[way]
        return self.BUF if limit is None else max(0, min(self.BUF, limit - self.moved[way]))

    def _drop(self, p: dict) -> None:
        for end in ("up", "down"):
            p[end].close()
        if p in self._pairs:
            self._pairs.remove(p)

    def _accept(self) -> None:
        down, _ = self._listener.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(self.target)
        except OSError:  # the daemon is not there (killed, not yet restarted): the notebook retries
            up.close()
            down.close()
            return
        self._pairs.append({"up": up, "down": down, "pending": {"up": b"", "down": b""}})

    def _serve(self) -> None:
        while not self._closing:
            reads, writes, source = [self._listener, self._wake_r], [], {}
            for p in self._pairs:
                for way, src, dst in (("up", "down", "up"), ("down", "up", "down")):
                    if p["pending"][way]:
                        writes.append(p[dst])
                    elif self._room(way):
                        reads.append(p[src])
                    source[p[src]] = (p, way, dst)
            readable, writable, _ = select.select(reads, writes, [])
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            if self._listener in readable:
                self._accept()
            for sock in writable:
                p = next((q for q in self._pairs if sock in (q["up"], q["down"])), None)
                if p is None:
                    continue
                way = "up" if sock is p["up"] else "down"
                try:
                    p["pending"][way] = p["pending"][way][sock.send(p["pending"][way]) :]
                except OSError:
                    self._drop(p)
            for sock in readable:
                if sock not in source or source[sock][0] not in self._pairs:
                    continue
                p, way, _ = source[sock]
                if not self._room(way):
                    continue  # held since the select
                try:
                    data = sock.recv(self._room(way))
                except OSError:
                    data = b""
                if not data:  # one end went: the whole connection goes, with what it held
                    self._drop(p)
                    continue
                p["pending"][way] += data
                self.moved[way] += len(data)
                if self.limit[way] is not None and self.moved[way] >= self.limit[way]:
                    self.held.set()
