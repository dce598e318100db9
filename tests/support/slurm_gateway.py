"""The Slurm gateway the notebook-level Slurm tests share: the one-node cluster of
tests/support/slurm.py (one per test module) and ``gateway``, a daemon with the slurm
backend in front of it; after each test Slurm's queue holds none of its jobs. For faults
at a point a test chooses: ``Splice`` (the notebook's connection, cut after so many
bytes), ``Background`` (the fault, in a thread, while the notebook runs a cell),
``unread_by``/``unread_on`` (what a stopped process has not read off its tcp sockets),
``spy`` (when the notebook's client pings or hears a pong), ``patient_shell`` and
``worker_facts``."""

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

from jupyter_gpu.client import DaemonClient
from support.daemons import start_daemon
from support.orphans import forget_daemon
from support.shells import run
from support.slurm import slurm_cluster

POLL_S = 0.2
JOIN_S = 120.0  # a fault injector's thread, at most


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
        """A copy of ``daemon``'s connection file naming this splice as its address (and no
        pid: the daemon behind it changes when a test restarts it)."""
        with open(daemon.connection_file) as f:
            info = json.load(f)
        info["url"] = self.url
        info.pop("pid", None)
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


class Background:
    """``fn`` in a thread (a fault injected while the test's notebook runs a cell);
    ``join`` re-raises what it raised."""

    def __init__(self, fn):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 -- raised again in the test's thread
            self.error = e

    def join(self) -> None:
        self.thread.join(JOIN_S)
        assert not self.thread.is_alive(), "the fault was never injected"
        if self.error is not None:
            raise self.error


def _unread(match) -> int:
    """Bytes waiting unread in the receive queues of the tcp sockets ``match(fields)``
    picks from /proc/net/tcp (local, remote, state, tx:rx queue, ..., inode)."""
    total = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if match(fields):
                total += int(fields[4].split(":")[1], 16)
    return total


def unread_by(pid: int) -> int:
    """What the daemon sent process ``pid`` (a stopped worker) that it has not read."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    return _unread(lambda f: f[9] in inodes)


def unread_on(port: int) -> int:
    """What reached the connections of local ``port`` (the daemon's worker address) unread."""
    return _unread(lambda f: int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01")


def patient_shell(make_shell, d):
    """A notebook that waits out a daemon restart (a minute without an answer) and pings
    every second of silence, so it hears soon from the daemon that comes back."""
    ip = make_shell(d)
    assert ip.run_cell("%config GPUMagics.heartbeat_timeout = 60.0").success
    assert ip.run_cell("%config GPUMagics.heartbeat_interval = 1.0").success
    return ip


def spy(monkeypatch, method: str, when=lambda msg, *rest: True) -> threading.Event:
    """An event set whenever the notebook's client calls its ``method`` (PING sent, PONG
    read) with arguments ``when`` accepts; the method runs as before."""
    event, real = threading.Event(), getattr(DaemonClient, method)

    def spied(self, *args, **kw):
        if when(*args):
            event.set()
        return real(self, *args, **kw)

    monkeypatch.setattr(DaemonClient, method, spied)
    return event


def worker_facts(ip) -> tuple[int, str, int]:
    """The worker's pid, its Slurm job and the daemon's port it dialled back to."""
    cell = "%%gpu cpu\nimport os\nprint(os.getpid(), os.environ['SLURM_JOB_ID'], os.environ['JUPYTER_GPU_ENDPOINT'])"
    result, cap = run(ip, cell)
    assert result.success, result.error_in_exec
    pid, job, endpoint = cap.stdout.split()
    return int(pid), job, int(endpoint.rsplit(":", 1)[1])
