"""Reaching a daemon on another machine through SSH: ``%gpu connect ssh://user@host[:port]``.

paramiko logs in (ssh-agent and ~/.ssh keys, or a given key file; a passphrase is asked
for by paramiko's agent/key loading and never stored), checks the host key against
known_hosts (an unknown host is refused with its fingerprint unless the user opts in),
reads the remote daemon's connection file over SFTP, and forwards a local loopback port
to the daemon's loopback tcp port. The client then talks to 127.0.0.1 as if local.

The forward itself is the system OpenSSH client's ``ssh -N -L`` when ``ssh`` is installed
(``jupyter_gpu.ssh_forward``: C in its own process, about OpenSSH's own speed), pinned to
the host key paramiko checked; else, or with ``$JUPYTER_GPU_SSH_CLIENT=paramiko``, one
background thread here pumps bytes through paramiko channels. ``auto`` (the default)
falls back to paramiko when ``ssh -L`` fails (say a key only paramiko could load), and
says why in the log. Either way the forward lives in the notebook, not the daemon.

The connection file is read with paramiko in both cases: one login that already holds
the host-key policy (known_hosts, the fingerprint of an unknown host, an explicit
opt-in) and whose key ssh is then pinned to, so both clients check the same key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import threading
from dataclasses import dataclass
from typing import Any

ENV_SSH_CLIENT = "JUPYTER_GPU_SSH_CLIENT"  # auto | openssh | paramiko
CLIENTS = ("auto", "openssh", "paramiko")
log = logging.getLogger("jupyter_gpu.tunnel")
REMOTE_CONNECTION_FILE = ".local/share/jupyter/runtime/jupyter-gpu-daemon.json"
_URL_RE = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>[^:/]+)(?::(?P<port>\d+))?/?$")


class TunnelError(Exception):
    """The tunnel could not be made; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    user: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> "Target":
        m = _URL_RE.match(url.strip())
        if not m:
            raise TunnelError(f"cannot read {url!r}: write ssh://user@host or ssh://user@host:port")
        return cls(m.group("user") or os.environ.get("USER", "root"), m.group("host"), int(m.group("port") or 22))


def fingerprint(key) -> str:  # noqa: ANN001
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class SSHTunnel:
    def __init__(
        self,
        url: str,
        key_file: str = "",
        known_hosts: str = "",
        accept_unknown_host: bool = False,
        remote_connection_file: str = REMOTE_CONNECTION_FILE,
        timeout: float = 15.0,
        ssh_client: str = "",
    ):
        """``ssh_client``: auto, openssh or paramiko (default: $JUPYTER_GPU_SSH_CLIENT, else auto)."""
        import paramiko

        self.target = Target.parse(url)
        choice = ssh_client or os.environ.get(ENV_SSH_CLIENT) or "auto"
        if choice not in CLIENTS:
            raise TunnelError(f"unknown ssh client {choice!r} (${ENV_SSH_CLIENT}): use one of {', '.join(CLIENTS)}")
        client = paramiko.SSHClient()
        known = known_hosts or os.path.expanduser("~/.ssh/known_hosts")
        if os.path.exists(known):
            client.load_host_keys(known)
        self._unknown: list[str] = []
        outer = self

        class Refuse(paramiko.MissingHostKeyPolicy):
            def missing_host_key(self, client, hostname, key):  # noqa: ANN001
                outer._unknown.append(f"{key.get_name()} {fingerprint(key)}")
                if accept_unknown_host:
                    client.get_host_keys().add(hostname, key.get_name(), key)
                    return
                raise paramiko.SSHException("unknown host key")

        client.set_missing_host_key_policy(Refuse())
        try:
            client.connect(
                self.target.host,
                self.target.port,
                self.target.user,
                key_filename=key_file or None,
                timeout=timeout,
                allow_agent=True,
                look_for_keys=not key_file,
            )
        except paramiko.SSHException as e:
            if self._unknown and not accept_unknown_host:
                raise TunnelError(
                    f"{self.target.host}:{self.target.port} is not in {known}; its host key is {self._unknown[0]}. "
                    "If that is right, add it there (ssh-keyscan) or connect with --accept-new-host."
                ) from None
            raise TunnelError(f"ssh to {self.target.user}@{self.target.host}:{self.target.port} failed: {e}") from None
        except OSError as e:
            raise TunnelError(f"cannot reach {self.target.host}:{self.target.port}: {e}") from None
        self.client = client
        try:
            self._start(choice, key_file, remote_connection_file, timeout)
        except BaseException:
            self.close()  # a tunnel that could not be made leaves no connection or ssh behind
            raise

    def _start(self, choice: str, key_file: str, remote_connection_file: str, timeout: float) -> None:
        """Read the daemon's connection file, then open the forward to its port."""
        self.forward: Any = None
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self.info = self._read_connection_file(remote_connection_file)
        m = re.match(r"^tcp://(127\.0\.0\.1|localhost):(\d+)$", self.info.get("url", ""))
        if not m:
            raise TunnelError(
                f"the daemon on {self.target.host} listens on {self.info.get('url')!r}; start it with "
                "`jupyter gpu daemon --url tcp://127.0.0.1:PORT` so SSH can forward to it"
            )
        self.remote_port = int(m.group(2))
        self.via = "paramiko"  # which client forwards: "openssh" or "paramiko"
        if choice != "paramiko" and self._start_openssh(choice, key_file, timeout):
            self.via = "openssh"
            self.local_port = self.forward.local_port
            self.client.close()  # the forward has its own connection; this one was for the file
            return
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.local_port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="jgpu-ssh-tunnel", daemon=True)
        self._thread.start()

    def _start_openssh(self, choice: str, key_file: str, timeout: float) -> bool:
        """Open the OpenSSH forward: True when it runs, False to use paramiko's (auto only)."""
        from jupyter_gpu.ssh_forward import ForwardError, OpenSSHForward, ssh_executable

        ssh = ssh_executable()
        try:
            if ssh is None:
                raise ForwardError("no OpenSSH client (`ssh`) on PATH")
            key = self.client.get_transport().get_remote_server_key()
            self.forward = OpenSSHForward(
                self.target.user,
                self.target.host,
                self.target.port,
                (key.get_name(), key.get_base64()),
                self.remote_port,
                key_file=key_file,
                timeout=timeout,
                ssh=ssh,
            )
            return True
        except (ForwardError, OSError) as e:
            if choice == "openssh":
                raise TunnelError(str(e)) from None
            log.warning("ssh://: OpenSSH's forward is not available (%s); forwarding through paramiko", e)
            return False

    def _read_connection_file(self, path: str) -> dict:
        try:
            with self.client.open_sftp() as sftp, sftp.open(path) as f:
                return json.loads(f.read())
        except (OSError, ValueError) as e:
            raise TunnelError(
                f"no jupyter-gpu daemon connection file at {self.target.host}:{path} ({e}); "
                "is `jupyter gpu daemon` running there?"
            ) from None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.local_port}"

    @property
    def key(self) -> bytes:
        return self.info["key"].encode()

    def alive(self) -> bool:
        """The forward still carries bytes: its ssh process runs, or paramiko's transport is up."""
        if self.forward is not None:
            return self.forward.alive() and not self._closed.is_set()
        transport = self.client.get_transport()
        return transport is not None and transport.is_active() and not self._closed.is_set()

    def _serve(self) -> None:
        """Accept local connections; pump each through its own SSH channel."""
        pairs: dict = {}
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._listener, *pairs], [], [], 0.5)
            except (OSError, ValueError):  # closed under us: the tunnel is being shut
                break
            for r in ready:
                if r is self._listener:
                    try:
                        conn, addr = self._listener.accept()
                    except OSError:
                        break
                    try:
                        chan = self.client.get_transport().open_channel(
                            "direct-tcpip", ("127.0.0.1", self.remote_port), addr
                        )
                    except Exception:  # noqa: BLE001 -- the tunnel is gone: the client's heartbeat reports it
                        conn.close()
                        continue
                    pairs[conn], pairs[chan] = chan, conn
                    continue
                other = pairs.get(r)
                try:
                    data = r.recv(1 << 20)
                except OSError:
                    data = b""
                if not data or other is None:
                    for s in (r, other):
                        if s is not None:
                            pairs.pop(s, None)
                            s.close()
                    continue
                other.sendall(data)
        for s in list(pairs):
            s.close()

    def close(self) -> None:
        """Stop the forward (the ssh process by its pid, or paramiko's thread and connection)."""
        self._closed.set()
        if self.forward is not None:
            self.forward.close()
        if self._listener is not None:
            self._listener.close()
        self.client.close()
