"""Reaching a daemon through a real OpenSSH server on a loopback port: host keys checked,
cells run through the tunnel, a tunnel killed mid-cell is reported and the next cell
reconnects. The daemon runs as on another host: its bulk directory is a tmpfs in a mount
namespace of its own, which the notebook cannot see, so values travel inline."""

from __future__ import annotations

import os
from pathlib import Path

from support.bulk_spy import spy_on_bulk
from support.shells import plain, run
from support.sshd_server import connect_line, connection_processes

from kernel_worker import protocol as P


def test_cells_run_through_ssh_and_a_killed_tunnel_recovers(sshd, elsewhere_daemon, make_shell, monkeypatch):
    daemon = elsewhere_daemon
    ip = make_shell(daemon)
    # A ping after 0.5 s of silence; 5 s without its pong is a lost tunnel (a loaded machine
    # may answer slowly, never that slowly).
    assert ip.run_cell("%config GPUMagics.heartbeat_interval = 0.5\n%config GPUMagics.heartbeat_timeout = 5.0").success

    result, cap = run(ip, connect_line(sshd, daemon, known_hosts=False))
    assert not result.success
    msg = str(result.error_in_exec)
    assert "is not in" in msg and "SHA256:" in msg and "--accept-new-host" in msg  # unknown host refused

    result, cap = run(ip, connect_line(sshd, daemon))
    assert result.success, cap.stdout
    assert f"connected to ssh://{sshd['user']}@127.0.0.1:{sshd['port']}: process backend" in cap.stdout
    spy = spy_on_bulk(monkeypatch)
    # 2 MB, over bulk.BULK_MIN: on the same host it would go through a bulk file.
    assert ip.run_cell("import numpy as np\nbig = np.ones(1 << 18)\nkept = 'warm'").success
    result, cap = run(ip, "%%gpu cpu --pull doubled\nprint('sum', big.sum(), kept)\ndoubled = big * 2")
    assert result.success, cap.stdout
    assert cap.stdout == "sum 262144.0 warm\n" and ip.user_ns["doubled"][1] == 2.0
    # Inline frames both ways: the daemon has a bulk root, the notebook cannot see its probe
    # there, so it wrote no bulk file and mapped none in.
    client = ip.magics_manager.registry["GPUMagics"].client
    assert client.call(P.Msg.HELLO)["bulk_root"] == str(daemon_dir(daemon) / "bulk")
    assert client.bulk_root() is None and os.listdir(daemon_dir(daemon) / "bulk") == []
    assert spy.sent == [] and spy.received == []

    # Kill the SSH connection from inside a running cell: the tunnel is gone mid-cell.
    ip.user_ns["sshd_conns"] = connection_processes(sshd["proc"].pid)
    assert ip.user_ns["sshd_conns"]
    result, cap = run(
        ip, "%%gpu cpu\nimport os, signal, time\nfor p in sshd_conns: os.kill(p, signal.SIGKILL)\ntime.sleep(1)"
    )
    assert not result.success
    assert "lost contact with the jupyter-gpu daemon" in plain(str(result.error_in_exec))
    # The next cell makes a new tunnel; the session and its namespace are still there.
    result, cap = run(ip, "%%gpu cpu\nprint('after', kept)")
    assert result.success and cap.stdout == "after warm\n", (result.error_in_exec, cap.stdout)


def daemon_dir(daemon) -> Path:
    return Path(daemon.connection_file).parent
