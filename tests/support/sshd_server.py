"""A real OpenSSH server on a loopback port, and a daemon that runs as on another host
(its bulk root a tmpfs in a mount namespace of its own), for tests that go through a
tunnel (test_ssh.py, test_faults.py, test_workdir_sync.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

from .daemons import Daemon, start_daemon
from .logs import LogWatcher
from .procs import stop_process

SSHD = "/usr/sbin/sshd"


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@contextmanager
def sshd_server(tmp: Path):
    """sshd on a free loopback port with its own host key and one authorised test key."""
    if not os.path.exists(SSHD):
        raise RuntimeError("sshd is not installed: `make test` installs Debian's openssh-server")
    d = tmp / "ssh"
    d.mkdir()
    host_pub = keygen(d / "host_key")
    user_pub = keygen(d / "id_test")
    (d / "authorized_keys").write_text(user_pub + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
        "Subsystem sftp internal-sftp\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    try:
        LogWatcher(proc.stderr, d / "sshd.log").wait_for(r"Server listening on 127\.0\.0\.1", timeout=20)
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        yield {"port": port, "dir": d, "proc": proc, "user": os.environ.get("USER") or "root"}
    finally:
        stop_process(proc, 10)


def elsewhere_daemon(tmp: Path, *args: str) -> Daemon:
    """A daemon on loopback tcp whose bulk root only it and its workers can see."""
    if shutil.which("unshare") is None:
        raise RuntimeError("unshare (util-linux) is needed to give the daemon a file system of its own")
    bulk = tmp / "bulk"
    bulk.mkdir(mode=0o700)
    mount = 'mount -t tmpfs -o mode=0700,size=512m jgpu-elsewhere "$0" && exec "$@"'
    return start_daemon(
        tmp,
        "--url=tcp://127.0.0.1:0",
        *args,
        prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(bulk)),
    )


def connect_line(sshd: dict, daemon: Daemon, known_hosts: bool = True) -> str:
    """``%gpu connect`` through ``sshd`` to ``daemon``; without ``known_hosts`` the host key
    is unknown (an empty known_hosts file)."""
    d = sshd["dir"]
    line = (
        f"%gpu connect ssh://{sshd['user']}@127.0.0.1:{sshd['port']} --key {d}/id_test "
        f"--connection-file {daemon.connection_file}"
    )
    return line + (f" --known-hosts {d}/known_hosts" if known_hosts else f" --known-hosts {d}/none")


def connection_processes(master: int) -> list[int]:
    """sshd's per-connection children (killing them kills the tunnel)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                kids.append(int(entry))
    return kids
