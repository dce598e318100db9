"""Finding the daemon: ssh://, tcp:// (CurveZMQ), an explicit connection file, or the
embedded local one; the same for the magic (in the kernel) and the Lab sidebar (in the
Jupyter Server), which both read ``DaemonTarget`` configuration and the environment.

With nothing configured, the first notebook starts a local daemon (process backend)
in the background; every later kernel finds it again through its connection file
in the Jupyter runtime directory. It exits by itself after a quiet period.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import time
from typing import Any

from jupyter_core.paths import jupyter_config_dir
from traitlets import Bool, Float, List, Unicode
from traitlets.config import Configurable

from jupyter_gpu.client import DaemonClient, DaemonError
from kernel_worker import protocol as P
from kernel_worker.daemon.paths import default_connection_file

ENV_CONNECTION_FILE = "JUPYTER_GPU_CONNECTION_FILE"
ENV_URL = "JUPYTER_GPU_URL"


class TargetError(ValueError):
    """The configured daemon cannot even be tried; the message says what to fix."""


class DaemonTarget(Configurable):
    """Which daemon to talk to, and how. ``c.DaemonTarget.*`` configures the magic and
    the Lab sidebar alike (``c.GPUMagics.*`` only the magic)."""

    connection_file = Unicode(
        "",
        help="Connection file of the daemon to use (url and key). Empty: $JUPYTER_GPU_CONNECTION_FILE, "
        "else a local daemon started on demand.",
    ).tag(config=True)
    daemon_url = Unicode(
        "", help="Daemon on another machine: ssh://user@host[:port] (or $JUPYTER_GPU_URL). Empty: local."
    ).tag(config=True)
    server_key = Unicode("", help="The tcp:// daemon's CurveZMQ public key (z85).").tag(config=True)
    client_key = Unicode(
        os.path.join(jupyter_config_dir(), "jupyter_gpu", "client"),
        help="Your CurveZMQ key pair for tcp:// daemons (PATH.key and PATH.key_secret; "
        "`jupyter gpu keys init --client`).",
    ).tag(config=True)
    ssh_key_file = Unicode("", help="Private key for ssh:// (default: ssh-agent and ~/.ssh keys).").tag(config=True)
    ssh_known_hosts = Unicode(
        "", help="known_hosts file that ssh:// host keys are checked against (~/.ssh/known_hosts)."
    ).tag(config=True)
    ssh_accept_new_host = Bool(False, help="Accept an ssh:// host whose key is not in known_hosts yet.").tag(
        config=True
    )
    ssh_remote_connection_file = Unicode(
        ".local/share/jupyter/runtime/jupyter-gpu-daemon.json",
        help="The remote daemon's connection file, relative to the remote home.",
    ).tag(config=True)
    heartbeat_interval = Float(5.0, help="Seconds of silence from the daemon before the client pings it.").tag(
        config=True
    )
    heartbeat_timeout = Float(10.0, help="Seconds without an answer to a ping before the daemon is declared lost.").tag(
        config=True
    )
    embedded_exit_when_idle = Float(
        1800.0, help="The embedded local daemon exits after this many quiet seconds with no sessions."
    ).tag(config=True)
    embedded_args = List(Unicode(), help="Extra command-line options for the embedded daemon.").tag(config=True)

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self._client: DaemonClient | None = None
        self._tunnel: Any = None

    def connected(self) -> DaemonClient:
        """The open client, opened (with its tunnel) on first use, and again when its SSH
        tunnel died since the last request (a request into a dead tunnel would only time out)."""
        if self._tunnel is not None and not self._tunnel.alive():
            self.disconnect()
        if self._client is None:
            self._client, self._tunnel = self.open_client()
        return self._client

    def disconnect(self) -> None:
        """Forget the connection (and its tunnel): the next request makes a new one."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def open_client(self) -> tuple[DaemonClient, Any]:
        """A client for the configured daemon, and the SSH tunnel it goes through (or None)."""
        target = self.daemon_url or os.environ.get(ENV_URL, "")
        curve, tunnel = None, None
        if target.startswith("ssh://"):
            tunnel = self._open_tunnel(target)
            url, key = tunnel.url, tunnel.key
        elif target.startswith("tcp://"):
            url, key, curve = target, b"", self._curve_keys(target)
        elif target:
            raise TargetError(f"cannot use daemon_url {target!r}: write ssh://user@host[:port] or tcp://host:port")
        else:
            url, key = resolve(
                self.connection_file, exit_when_idle=self.embedded_exit_when_idle, extra_args=list(self.embedded_args)
            )
        return DaemonClient(url, key, self.heartbeat_interval, self.heartbeat_timeout, curve=curve), tunnel

    def _curve_keys(self, target: str) -> tuple[bytes, bytes, bytes]:
        from kernel_worker import keys

        if not self.server_key:
            raise TargetError(
                f"{target} needs the daemon's CurveZMQ public key: --server-key (`jupyter gpu keys show` there)"
            )
        try:
            public, secret = keys.load(os.path.dirname(self.client_key), os.path.basename(self.client_key))
        except FileNotFoundError:
            raise TargetError(
                f"no CurveZMQ key pair at {self.client_key}: make one with `jupyter gpu keys init --client` "
                "and ask the daemon's operator to authorise its public key"
            ) from None
        return self.server_key.encode(), public, secret

    def _open_tunnel(self, target: str) -> Any:
        from jupyter_gpu.tunnel import SSHTunnel, TunnelError

        try:
            return SSHTunnel(
                target,
                key_file=self.ssh_key_file,
                known_hosts=self.ssh_known_hosts,
                accept_unknown_host=self.ssh_accept_new_host,
                remote_connection_file=self.ssh_remote_connection_file,
            )
        except TunnelError as e:
            raise TargetError(str(e)) from None


def read_connection_file(path: str) -> tuple[str, bytes]:
    with open(path) as f:
        info = json.load(f)
    return info["url"], info["key"].encode()


def _alive(path: str, timeout: float) -> tuple[str, bytes] | None:
    """(url, key) of a daemon that answers a ping, else None."""
    try:
        url, key = read_connection_file(path)
    except (OSError, ValueError, KeyError):
        return None
    client = DaemonClient(url, key)
    try:
        client.call("ping", timeout=timeout)
        return url, key
    except DaemonError:
        return None
    finally:
        client.close()


def start_embedded(
    connection_file: str | None = None,
    exit_when_idle: float = 1800.0,
    start_timeout: float = 30.0,
    extra_args: list[str] | None = None,
) -> tuple[str, bytes]:
    """Find the local daemon or start one, shared by every kernel of this user.

    A lock file serialises kernels starting at the same moment, so exactly one daemon runs.
    """
    path = connection_file or default_connection_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _alive(path, timeout=2.0)
        if found:
            return found
        log_path = path.removesuffix(".json") + ".log"
        log = open(log_path, "ab")
        args = [
            sys.executable,
            "-m",
            "kernel_worker",
            f"--WorkerDaemon.connection_file={path}",
            f"--WorkerDaemon.exit_when_idle={exit_when_idle}",
            "--print-ready",
            *(extra_args or []),
        ]
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + start_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                proc.kill()
                raise DaemonError(
                    "worker_start_failed",
                    f"the local jupyter-gpu daemon did not start in {start_timeout:g} s; see {log_path}",
                )
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise DaemonError(
                    "worker_start_failed",
                    f"the local jupyter-gpu daemon exited at start (code {proc.wait()}); see {log_path}",
                )
            line += chunk
        proc.stdout.close()
        return read_connection_file(path)


def nothing_listens(url: str) -> bool:
    """An ipc url whose socket file is gone: nothing can answer there, so say so at once."""
    return url.startswith("ipc://") and not os.path.exists(url[len("ipc://") :])


def _not_running(path: str) -> str:
    """Why the daemon a connection file names is plainly not there, or "". Only for a
    daemon on this host (an ipc socket, a loopback port): its socket file and its pid say
    so at once, where a request would wait a whole heartbeat timeout."""
    with open(path) as f:
        info = json.load(f)
    url, pid = str(info.get("url", "")), info.get("pid")
    if not P.on_this_host(url):
        return ""
    if nothing_listens(url):
        return f"nothing listens at {url}"
    if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process {pid} is gone"
        except PermissionError:
            pass  # alive, as another user
    return ""


def resolve(connection_file: str = "", **embedded: object) -> tuple[str, bytes]:
    """(url, key) of the daemon to use: configured, from the environment, or embedded."""
    path = connection_file or os.environ.get(ENV_CONNECTION_FILE, "")
    if path:
        try:
            gone = _not_running(path)
            if gone:
                raise DaemonError(
                    P.Err.UNAVAILABLE,
                    f"the jupyter-gpu daemon of {path} is not running ({gone}): start it again "
                    "(`jupyter gpu daemon ...` on its host), or point to another with --connection-file",
                )
            return read_connection_file(path)
        except FileNotFoundError:
            raise DaemonError(
                "no_session",
                f"no daemon connection file at {path}: is that daemon running? (it writes the file when it starts)",
            ) from None
        except (OSError, ValueError, KeyError) as e:
            raise DaemonError("no_session", f"cannot read the daemon connection file {path}: {e}") from None
    return start_embedded(**embedded)  # type: ignore[arg-type]
