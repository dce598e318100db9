"""The system OpenSSH client's local forward, for ``ssh://`` when ``ssh`` is installed.

Why: paramiko forwards in one Python thread (1 MiB reads re-sliced into 32 KiB packets,
one stalled direction stalling all); OpenSSH forwards in C in its own process, so
``ssh://`` runs at OpenSSH's own speed. The tunnel (``jupyter_gpu.tunnel``) has already
logged in with paramiko, checked the host key against known_hosts and read the daemon's
connection file; here ``ssh -N -L`` is started with that very host key pinned (a private
known_hosts with one line, strict checking), so OpenSSH checks the key paramiko checked
and nothing is written to the user's files. The process is stopped by its pid when the
tunnel closes, at interpreter exit (atexit) and, on Linux, when the kernel dies
(PR_SET_PDEATHSIG); it runs in a session of its own, out of reach of the signals Jupyter
sends the kernel's process group.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future

READY = "jgpu-forward-ready"  # what LocalCommand prints: ssh runs it once its forwards listen
ALIAS = "jgpu-tunnel-target"  # HostKeyAlias: the pinned known_hosts line is found under this name
ENV_SSH = "JUPYTER_GPU_SSH"  # the ssh executable (default: `ssh` on PATH)
_BIND_FAILED = re.compile(r"Address already in use|cannot listen to port|Could not request local forwarding")
# OpenSSH's default ciphers with AES-GCM first: with AES instructions it is about twice
# chacha20-poly1305 (OpenSSH's first choice) on one core; without them the default order.
GCM_FIRST = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr"
)


class ForwardError(Exception):
    """ssh could not open the forward; the message has ssh's own words."""


def ssh_executable() -> str | None:
    """The OpenSSH client to use, or None when there is none."""
    return shutil.which(os.environ.get(ENV_SSH) or "ssh")


def has_aes_instructions() -> bool:
    """Whether this CPU advertises AES instructions (x86 ``aes`` flag, arm64 ``aes`` feature)."""
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^(flags|Features)\s*:.*\baes\b", f.read(), re.M) is not None
    except OSError:
        return sys.platform == "darwin"  # Apple silicon and recent Intel Macs both have them


def free_port() -> int:
    """A loopback port free right now (ssh may lose it to someone else: then it is retried)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ starting ssh


def _pdeathsig() -> object:
    """A preexec_fn that makes the child get SIGTERM when its parent thread dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_it() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: nobody will stop us
            os._exit(1)

    return set_it


class _Spawner(threading.Thread):
    """Starts every forward from one thread that lives as long as the process: the death
    signal is sent when the *thread* that forked dies, and a cell's or a background job's
    thread may end long before the kernel."""

    def __init__(self) -> None:
        super().__init__(name="jgpu-ssh-spawner", daemon=True)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            args, kw, done = self.jobs.get()
            try:
                done.set_result(subprocess.Popen(args, **kw))
            except BaseException as e:  # noqa: BLE001 -- handed to the caller
                done.set_exception(e)


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def spawn(args: list[str], **kw: object) -> subprocess.Popen:
    """``subprocess.Popen(args, **kw)`` from the long-lived spawner thread, with the death signal."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
            _spawner.start()
    done: Future = Future()
    # A session of its own: Jupyter signals the kernel's whole process group (SIGINT on
    # interrupt, SIGTERM at shutdown, before the kernel's exit handlers release the session
    # through this very forward); ssh must only ever be stopped by us, by its pid.
    _spawner.jobs.put((args, {**kw, "preexec_fn": _pdeathsig(), "start_new_session": True}, done))
    return done.result()


def stop(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM by its pid, SIGKILL after ``grace`` seconds, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


_open: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """At interpreter exit, every forward still open (registered at import, before the
    magic's own exit handler, so the session is released through the forward first)."""
    for fwd in list(_open):
        fwd.close()


# ------------------------------------------------------------------ the forward


class OpenSSHForward:
    """``ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE`` to ``user@host:port``, ready when made."""

    def __init__(
        self,
        user: str,
        host: str,
        port: int,
        host_key: tuple[str, str],
        remote_port: int,
        key_file: str = "",
        timeout: float = 15.0,
        ssh: str | None = None,
        attempts: int = 3,
    ):
        """``host_key`` is (type, base64) of the key already checked against known_hosts."""
        self.ssh = ssh or ssh_executable() or "ssh"
        self.remote_port = remote_port
        self.proc: subprocess.Popen | None = None
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="jgpu-ssh-")  # 0700: the pinned key and ssh's log
        self._known = os.path.join(self._dir, "known_hosts")
        with open(self._known, "w") as f:
            f.write(f"{ALIAS} {host_key[0]} {host_key[1]}\n")
        self._base = [self.ssh, "-N", "-p", str(port), "-l", user, *self._options(timeout, key_file), host]
        try:
            for attempt in range(attempts):
                self.local_port = free_port()
                err = self._start(timeout)
                if not err:
                    break
                if not _BIND_FAILED.search(err) or attempt == attempts - 1:
                    raise ForwardError(f"ssh -L to {user}@{host}:{port} failed: {err.strip() or 'no reason given'}")
        except BaseException:
            self.close()
            raise
        _open.add(self)

    def _options(self, timeout: float, key_file: str) -> list[str]:
        opts = {
            "BatchMode": "yes",  # never a prompt: the notebook has no terminal
            "StrictHostKeyChecking": "yes",  # only the pinned key, never a new one
            "UserKnownHostsFile": self._known,
            "GlobalKnownHostsFile": "/dev/null",
            "HostKeyAlias": ALIAS,
            "CheckHostIP": "no",
            "UpdateHostKeys": "no",
            "ExitOnForwardFailure": "yes",
            "ServerAliveInterval": "15",  # a dead link ends the process: alive() reports it
            "ServerAliveCountMax": "3",
            "ConnectTimeout": str(max(1, int(timeout))),
            "ControlMaster": "no",  # our own connection, in our own process, never a mux client
            "ControlPath": "none",
            "PermitLocalCommand": "yes",
            "LocalCommand": f"echo {READY}",  # run after the forward listens: our ready signal
            "LogLevel": "ERROR",
        }
        if has_aes_instructions():
            opts["Ciphers"] = GCM_FIRST
        args = [a for k, v in opts.items() for a in ("-o", f"{k}={v}")]
        if key_file:
            args += ["-i", key_file, "-o", "IdentitiesOnly=yes"]
        return args

    def _start(self, timeout: float) -> str:
        """Start ssh and wait for its ready line: "" when ready, else why it failed."""
        with open(os.path.join(self._dir, "ssh.log"), "wb") as log:
            self.proc = spawn(
                [*self._base[:-1], "-L", f"127.0.0.1:{self.local_port}:127.0.0.1:{self.remote_port}", self._base[-1]],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        out, line = self.proc.stdout, b""
        deadline = time.monotonic() + timeout
        try:
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([out], [], [], left)[0]:
                    stop(self.proc)
                    return f"no forward after {timeout:g} s"
                chunk = os.read(out.fileno(), 256)
                if not chunk:
                    break
                line += chunk
        finally:
            out.close()
        if line.strip() == READY.encode():
            return ""
        stop(self.proc)
        with open(os.path.join(self._dir, "ssh.log"), errors="replace") as f:
            return f.read() or f"ssh exited with {self.proc.returncode}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        """The ssh process still runs (it exits when its connection or forward dies)."""
        return not self._closed and self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop ssh by its pid and remove the pinned key; idempotent."""
        self._closed = True
        _open.discard(self)
        if self.proc is not None:
            stop(self.proc)
        shutil.rmtree(self._dir, ignore_errors=True)
