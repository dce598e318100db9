"""A daemon that is not there is reported at once, in one actionable line, by the CLI
and by a cell, not after a heartbeat timeout and never as a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from support.shells import plain, run

AT_ONCE_S = 5.0  # a request would wait the whole heartbeat timeout (15 s) first


def _killed(daemon_factory):
    """A real daemon killed with SIGKILL: its connection file and ipc socket stay behind."""
    d = daemon_factory()
    assert set(d.client().call("ping", timeout=10)) == {"incarnation"}
    d.kill()
    return d


def _cli(connection_file: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", "--connection-file", connection_file, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out, time.monotonic() - t


def test_the_cli_says_at_once_that_a_killed_daemon_is_not_running(daemon_factory):
    d = _killed(daemon_factory)
    for args in (["status", "--json"], ["volumes", "ls"]):
        out, took = _cli(d.connection_file, *args)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr == (
            f"jupyter gpu {args[0]}: the jupyter-gpu daemon of {d.connection_file} is not running (its process "
            f"{d.proc.pid} is gone): start it again (`jupyter gpu daemon ...` on its host), or point to another "
            "with --connection-file\n"
        )
        assert took < AT_ONCE_S, took


def test_a_connection_file_whose_socket_is_gone(tmp_path):
    cf = tmp_path / "d.json"
    cf.write_text(json.dumps({"url": f"ipc://{tmp_path}/gone.sock", "key": "k", "pid": 1, "backend": "process"}))
    out, took = _cli(str(cf), "status")
    assert out.returncode == 1 and f"(nothing listens at ipc://{tmp_path}/gone.sock)" in out.stderr
    assert "Traceback" not in out.stderr and took < AT_ONCE_S


def test_a_cell_says_at_once_that_its_daemon_is_not_running(daemon_factory, make_shell):
    d = _killed(daemon_factory)
    ip = make_shell(d)
    t = time.monotonic()
    result, cap = run(ip, "%%gpu any\nprint('never')")
    assert time.monotonic() - t < AT_ONCE_S
    assert not result.success and "never" not in cap.stdout
    error = plain(str(result.error_in_exec))
    assert error.startswith(f"the jupyter-gpu daemon of {d.connection_file} is not running (its process"), error
