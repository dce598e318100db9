"""The worker's namespace is known, not assumed: whatever happened to the worker since the
last cell (idle release, `%gpu release`, a daemon restart, the warm pool, its death, a
second client on the session), a cell that reads a notebook variable gets its value."""

from __future__ import annotations

import pytest
from support.shells import notes, plain, run

from kernel_worker import protocol as P
from kernel_worker import serialize

READ_A = "%%gpu any\nprint(a)"


def _magics(ip):
    return ip.magics_manager.registry["GPUMagics"]


def _ok(ip, cell: str) -> str:
    result, cap = run(ip, cell)
    assert result.success, (cell, cap.stdout, cap.stderr, result.error_in_exec)
    return cap.stdout


@pytest.mark.parametrize("pool", [[], ["--WorkerDaemon.keep_warm={'cpu': 1}"]], ids=["cold", "warm-pool"])
def test_a_variable_survives_an_idle_release(daemon_factory, make_shell, backend_args, pool):
    d = daemon_factory("--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2", *backend_args, *pool)
    ip = make_shell(d)
    _ok(ip, "a = 41\nimport numpy as np\nbig = np.arange(2**18, dtype=np.float64)")  # 2 MiB: the bulk path
    assert _ok(ip, "%%gpu any\nprint(a, big.sum())") == "41 34359607296.0\n"
    d.log.wait_for(rf"session {_magics(ip).session_id} released: it was idle", timeout=30)
    out = _ok(ip, "%%gpu any\nprint(a + 1, big.sum())")
    assert out.endswith("42 34359607296.0\n"), out
    assert "NameError" not in out


def test_a_variable_and_a_large_value_survive_gpu_release(daemon, make_shell):
    ip = make_shell(daemon)
    _ok(ip, "a = 41\nimport numpy as np\nbig = np.ones(2**18)")
    assert _ok(ip, "%%gpu any\nprint(a, big.sum())") == "41 262144.0\n"
    assert "released" in _ok(ip, "%gpu release")
    assert _ok(ip, "%%gpu any\nprint(a, big.sum())").endswith("41 262144.0\n")


def test_a_variable_survives_a_daemon_killed_and_restarted(daemon_factory, make_shell):
    d = daemon_factory()
    ip = make_shell(d)
    _ok(ip, "a = 41")
    assert _ok(ip, READ_A) == "41\n"
    d.kill()
    daemon_factory()  # same connection file, key and socket: the notebook's client finds it
    assert _ok(ip, READ_A).endswith("41\n")


def test_a_variable_survives_its_worker_being_killed(daemon, make_shell):
    ip = make_shell(daemon)
    _ok(ip, "a = 41")
    assert _ok(ip, READ_A) == "41\n"
    result, cap = run(ip, "%%gpu any\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not result.success
    assert _ok(ip, READ_A).endswith("41\n")


def test_a_second_client_on_the_session_cannot_leave_a_stale_value(daemon, make_shell):
    ip = make_shell(daemon)
    _ok(ip, "a = 41")
    assert _ok(ip, READ_A) == "41\n"
    specs, frames = serialize.dump_values({"a": 7})  # another kernel of the same notebook sends its own a
    other = daemon.client()
    push = P.Message(P.Msg.EXECUTE, {"code": "", "values": specs}, _magics(ip).session_id, buffers=frames)
    assert other.request(push, timeout=60).content["loaded"]
    assert _ok(ip, READ_A) == "41\n"


def test_a_value_only_the_lost_worker_had_is_named_and_nothing_runs(daemon, make_shell):
    ip = make_shell(daemon)
    _ok(ip, "%%gpu any\nmodel = 'trained'")
    result, cap = run(ip, "%%gpu any\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not result.success
    result, cap = run(ip, "%%gpu any\nran = True\nprint(model)")
    assert not result.success
    error = plain(str(result.error_in_exec))
    assert error.startswith("model existed only on the remote worker, which is gone"), error
    assert "`%gpu pull NAME` keeps a copy" in error
    result, cap = run(ip, "%%gpu any\nprint('ran' in globals())")
    assert cap.stdout.endswith("False\n")  # the refused cell did not run at all


def test_a_cell_reads_the_notebooks_files_where_the_notebook_is(daemon_factory, make_shell, tmp_path, monkeypatch):
    nb = tmp_path / "project"
    (nb / "data").mkdir(parents=True)
    (nb / "data" / "iris.csv").write_text("sepal,petal\n5.1,1.4\n4.9,1.4\n4.7,1.3\n")
    (nb / "helper.py").write_text("VALUE = 'from beside the notebook'\n")
    monkeypatch.chdir(nb)  # a kernel starts in its notebook's directory
    ip = make_shell(daemon_factory())
    out = _ok(
        ip,
        "%%gpu any\n!head -2 data/iris.csv\nimport pandas as pd, helper\n"
        "print(len(pd.read_csv('data/iris.csv')), helper.VALUE)",
    )
    assert out.replace("\r\n", "\n").endswith("sepal,petal\n5.1,1.4\n3 from beside the notebook\n"), out  # !cmd: a pty
    (nb / "other").mkdir()
    _ok(ip, "%cd other")  # the notebook moves: the worker follows
    assert _ok(ip, "%%gpu any\nimport os\nprint(os.getcwd())").endswith(f"{nb / 'other'}\n")


def test_bytes_and_split_characters_come_out_whole(daemon_factory, make_shell):
    ip = make_shell(daemon_factory())
    cell = (
        "%%gpu any\nimport sys, os\n"
        "sys.stdout.buffer.write('é'.encode()[:1]); sys.stdout.buffer.write('é'.encode()[1:] + b' bytes\\n')\n"
        "sys.stdout.flush()\n"
        "os.write(1, '€'.encode()[:2]); os.write(1, '€'.encode()[2:] + b' fd\\n')"
    )
    out = _ok(ip, cell)
    assert "é bytes\n" in out and "€ fd\n" in out and "\ufffd" not in out, out


@pytest.mark.parametrize("ending, ok", [("exit()", True), ("import sys; sys.exit(3)", False)])
def test_exit_in_a_cell_ends_the_worker_like_a_kernel_and_the_next_cell_starts_fresh(daemon, make_shell, ending, ok):
    ip = make_shell(daemon)
    result, cap = run(ip, f"%%gpu any\nx = 1\n{ending}\nprint('rest of the cell')")
    assert result.success is ok
    assert cap.stdout.startswith("rest of the cell\n") if ok else "SystemExit" in plain(cap.stdout)
    assert notes(cap)[-1].startswith("the cell called exit() or raised SystemExit: its worker ended and the session")
    assert daemon.client().call(P.Msg.STATUS)["sessions"] == []  # released: no GPU or worker held
    result, cap = run(ip, "%%gpu any\nprint('x' in globals())")
    assert result.success and cap.stdout == "False\n"


def test_a_cell_sent_while_its_session_is_being_released_gets_a_new_worker(daemon_factory, make_shell, backend_args):
    d = daemon_factory("--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2", *backend_args)
    ip = make_shell(d)
    _ok(ip, "a = 41")
    assert _ok(ip, READ_A) == "41\n"
    d.log.wait_for(rf"session {_magics(ip).session_id} ending: it was idle", timeout=30)
    # The old worker, its socket and its directories are still being removed: same names.
    assert _ok(ip, READ_A).endswith("41\n")
