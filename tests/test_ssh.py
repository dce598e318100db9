"""Reaching a daemon through a real OpenSSH server on a loopback port: host keys checked,
cells run through the tunnel, a tunnel killed mid-cell is reported and the next cell
reconnects. The daemon runs as on another host: its bulk directory is a tmpfs in a mount
namespace of its own, which the notebook cannot see, so values travel inline. Both
forwards are covered: the system OpenSSH client's ``ssh -L`` (what ``auto`` picks when
``ssh`` is installed) and paramiko's, and the ssh process is shown stopped when the tunnel
dies, closes, and when its kernel exits or is killed."""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path

import pytest
from support.bulk_spy import spy_on_bulk
from support.kernels import kernel
from support.kernels import kill as kill_kernel
from support.kernels import run as krun
from support.shells import plain, run
from support.sshd_server import connect_line, connection_processes

from jupyter_gpu import ssh_forward, tunnel
from kernel_worker import protocol as P

WAIT_S = 60.0  # how long a process may take to go on a loaded machine (not a bound under test)


@pytest.mark.parametrize("ssh_client", ["openssh", "paramiko"])
def test_cells_run_through_ssh_and_a_killed_tunnel_recovers(
    ssh_client, sshd, elsewhere_daemon, make_shell, monkeypatch
):
    monkeypatch.setenv(tunnel.ENV_SSH_CLIENT, ssh_client)
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
    assert magics(ip)._tunnel.via == ssh_client
    spy = spy_on_bulk(monkeypatch)
    # 2 MB, over bulk.BULK_MIN: on the same host it would go through a bulk file.
    assert ip.run_cell("import numpy as np\nbig = np.ones(1 << 18)\nkept = 'warm'").success
    result, cap = run(ip, "%%gpu cpu --pull doubled\nprint('sum', big.sum(), kept)\ndoubled = big * 2")
    assert result.success, cap.stdout
    assert cap.stdout == "sum 262144.0 warm\n" and ip.user_ns["doubled"][1] == 2.0
    # Inline frames both ways: the daemon has a bulk root, the notebook cannot see its probe
    # there, so it wrote no bulk file and mapped none in.
    client = magics(ip).client
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


def test_openssh_forward_killed_while_idle_is_reopened(sshd, elsewhere_daemon, make_shell, monkeypatch):
    """``auto`` picks OpenSSH's forward; its ssh process SIGKILLed between cells is seen dead
    (alive() is False) and the next cell opens a new one, to the same session."""
    monkeypatch.delenv(tunnel.ENV_SSH_CLIENT, raising=False)
    known = sshd["dir"] / "known_hosts"
    before = known.read_text()
    ip = make_shell(elsewhere_daemon)
    assert run(ip, connect_line(sshd, elsewhere_daemon))[0].success
    first = magics(ip)._tunnel
    assert first.via == "openssh" and first.alive()
    assert ssh_cmdline(first.forward.pid)[:2] == [ssh_forward.ssh_executable(), "-N"]
    assert f"127.0.0.1:{first.local_port}:127.0.0.1:{first.remote_port}" in ssh_cmdline(first.forward.pid)
    assert run(ip, "%%gpu cpu\nkept = 'warm'")[0].success

    os.kill(first.forward.pid, signal.SIGKILL)
    assert first.forward.proc.wait(WAIT_S) == -signal.SIGKILL
    assert not first.alive()  # what the next cell's connected() asks
    result, cap = run(ip, "%%gpu cpu\nprint('after', kept)")
    assert result.success and cap.stdout == "after warm\n", (result.error_in_exec, cap.stdout)
    second = magics(ip)._tunnel
    assert second is not first and second.via == "openssh" and second.alive()
    assert not os.path.exists(first.forward._dir)  # the dead forward's pinned key is gone too

    magics(ip)._drop_client()  # the tunnel closes: its ssh is stopped by its pid and reaped
    assert second.forward.proc.returncode is not None and not os.path.exists(second.forward._dir)
    assert known.read_text() == before  # ssh checked a pinned copy of the key: nothing written


@pytest.mark.parametrize("how", ["shutdown", "killed"])
def test_the_ssh_forward_ends_with_its_kernel(how, sshd, elsewhere_daemon):
    """A kernel that exits releases its session through the forward, then stops it
    (atexit); one SIGKILLed takes it along (the forward gets SIGTERM when its parent
    dies): no ssh is left behind either way."""
    with kernel(elsewhere_daemon.connection_file) as (km, kc):
        assert krun(kc, connect_line(sshd, elsewhere_daemon))[1] == "ok"
        assert krun(kc, "%%gpu cpu\npass")[1] == "ok"
        assert len(sessions(elsewhere_daemon)) == 1
        show = "t = get_ipython().magics_manager.registry['GPUMagics']._tunnel\nprint(t.via, t.forward.pid)"
        out, status = krun(kc, show)
        assert status == "ok", out
        via, pid = out.split()
        assert via == "openssh"
        gone = os.pidfd_open(int(pid))  # readable once that ssh has exited, whoever reaps it
        try:
            if how == "shutdown":
                km.shutdown_kernel(now=False)  # a shutdown request: the kernel exits, atexit runs
            else:
                kill_kernel(km)
            assert select.select([gone], [], [], WAIT_S)[0], f"ssh {pid} outlived its kernel ({how})"
        finally:
            os.close(gone)
    if how == "shutdown":  # released on the way out, before the forward went (a killed one is reaped later)
        assert sessions(elsewhere_daemon) == []


def test_a_kernel_interrupt_leaves_the_forward_alone(sshd, elsewhere_daemon):
    """Jupyter interrupts a kernel by signalling its process group: the ssh forward is in a
    session of its own, so the interrupt reaches the cell through it and it stays up."""
    show = "t = get_ipython().magics_manager.registry['GPUMagics']._tunnel\nprint(t.via, t.forward.pid, t.alive())"
    with kernel(elsewhere_daemon.connection_file) as (km, kc):
        assert krun(kc, connect_line(sshd, elsewhere_daemon))[1] == "ok"
        out, status = krun(kc, show)
        via, pid, alive = out.split()
        assert (via, alive, status) == ("openssh", "True", "ok")
        kernel_pid = km.provisioner.process.pid
        assert os.getsid(int(pid)) != os.getsid(kernel_pid) and os.getpgid(int(pid)) != os.getpgid(kernel_pid)
        msg_id = kc.execute("%%gpu cpu\nimport time\nprint('started', flush=True)\nwhile True: time.sleep(0.05)")
        while True:  # until the cell runs on the worker
            m = kc.get_iopub_msg(timeout=WAIT_S)
            if m["msg_type"] == "stream" and "started" in m["content"]["text"]:
                break
        km.interrupt_kernel()  # SIGINT to the kernel's process group
        reply = kc.get_shell_msg(timeout=WAIT_S)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
        out, status = krun(kc, "%%gpu cpu\nprint('next')")
        assert (out, status) == ("next\n", "ok")
        assert krun(kc, show)[0].split() == ["openssh", pid, "True"]  # the same forward carried it


def test_auto_falls_back_to_paramiko_without_ssh(sshd, elsewhere_daemon, monkeypatch):
    """No OpenSSH client: ``auto`` forwards through paramiko, ``openssh`` says why it cannot."""
    monkeypatch.setenv(ssh_forward.ENV_SSH, "/nonexistent/ssh")
    d = sshd["dir"]
    args = dict(key_file=f"{d}/id_test", known_hosts=f"{d}/known_hosts")
    args["remote_connection_file"] = elsewhere_daemon.connection_file
    url = f"ssh://{sshd['user']}@127.0.0.1:{sshd['port']}"
    t = tunnel.SSHTunnel(url, **args)
    try:
        assert t.via == "paramiko" and t.forward is None and t.alive()
    finally:
        t.close()
    assert not t.alive()
    with pytest.raises(tunnel.TunnelError, match="no OpenSSH client"):
        tunnel.SSHTunnel(url, ssh_client="openssh", **args)
    with pytest.raises(tunnel.TunnelError, match="unknown ssh client"):
        tunnel.SSHTunnel(url, ssh_client="putty", **args)


def sessions(daemon) -> list:
    return daemon.client().call(P.Msg.STATUS)["sessions"]


def magics(ip):
    return ip.magics_manager.registry["GPUMagics"]


def ssh_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")[:-1]


def daemon_dir(daemon) -> Path:
    return Path(daemon.connection_file).parent
