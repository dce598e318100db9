"""Reaching a daemon through a real OpenSSH server on a loopback port: host keys checked,
cells run through the tunnel, a tunnel killed mid-cell is reported and the next cell
reconnects."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from support.logs import LogWatcher
from support.procs import stop_process
from support.shells import plain, run

SSHD = "/usr/sbin/sshd"


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def sshd(tmp_path):
    """sshd on a free loopback port with its own host key and one authorised test key."""
    if not os.path.exists(SSHD):
        raise RuntimeError("sshd is not installed: `make test` installs Debian's openssh-server")
    d = tmp_path / "ssh"
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
    LogWatcher(proc.stderr, d / "sshd.log").wait_for(r"Server listening on 127\.0\.0\.1", timeout=20)
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    yield {"port": port, "dir": d, "proc": proc, "user": os.environ.get("USER") or "root"}
    stop_process(proc, 10)


def connect_line(sshd, daemon, known_hosts: bool = True) -> str:
    d = sshd["dir"]
    line = f"%gpu connect ssh://{sshd['user']}@127.0.0.1:{sshd['port']} --key {d}/id_test --connection-file {daemon.connection_file}"
    return line + (f" --known-hosts {d}/known_hosts" if known_hosts else f" --known-hosts {d}/none")


def session_processes(master: int) -> list[int]:
    """sshd's per-connection children."""
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


def test_cells_run_through_ssh_and_a_killed_tunnel_recovers(sshd, daemon_factory, make_shell):
    daemon = daemon_factory("--url=tcp://127.0.0.1:0")
    ip = make_shell(daemon)
    ip.run_cell("%config GPUMagics.heartbeat_interval = 0.5\n%config GPUMagics.heartbeat_timeout = 1.0")

    result, cap = run(ip, connect_line(sshd, daemon, known_hosts=False))
    assert not result.success
    msg = str(result.error_in_exec)
    assert "is not in" in msg and "SHA256:" in msg and "--accept-new-host" in msg  # unknown host refused

    result, cap = run(ip, connect_line(sshd, daemon))
    assert result.success, cap.stdout
    assert f"connected to ssh://{sshd['user']}@127.0.0.1:{sshd['port']}: process backend" in cap.stdout
    ip.run_cell("import numpy as np\nbig = np.ones(1 << 18)\nkept = 'warm'")  # 2 MB: inline frames, no bulk path
    result, cap = run(ip, "%%gpu cpu --pull doubled\nprint('sum', big.sum(), kept)\ndoubled = big * 2")
    assert result.success, cap.stdout
    assert "sum 262144.0 warm" in cap.stdout and ip.user_ns["doubled"][1] == 2.0

    # Kill the SSH connection from inside a running cell: the tunnel is gone mid-cell.
    ip.user_ns["sshd_conns"] = session_processes(sshd["proc"].pid)
    assert ip.user_ns["sshd_conns"]
    result, cap = run(
        ip, "%%gpu cpu\nimport os, signal, time\nfor p in sshd_conns: os.kill(p, signal.SIGKILL)\ntime.sleep(1)"
    )
    assert not result.success
    assert "lost contact with the jupyter-gpu daemon" in plain(str(result.error_in_exec))
    # The next cell makes a new tunnel; the session and its namespace are still there.
    result, cap = run(ip, "%%gpu cpu\nprint('after', kept)")
    assert result.success and "after warm" in cap.stdout, (result.error_in_exec, cap.stdout)
