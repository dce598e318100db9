"""%%gpu in a real InteractiveShell against a real daemon subprocess."""

from __future__ import annotations

import os
import re
import select
import threading
import time

import numpy as np
import pytest
from support.shells import notes, plain, run

from kernel_worker import protocol as P


def test_closures_of_each_kind_travel_with_the_cell(shell):
    shell.run_cell(
        "import numpy as np, math\n"
        "a = np.arange(10.0); scale = 3.0\n"
        "def f(x): return x * scale\n"
        "g = lambda x: x + 1\n"
        "class Box:\n"
        "    def __init__(self, v): self.v = v\n"
        "    def twice(self): return 2 * self.v\n"
        "def make_adder(n):\n"
        "    def add(x): return x + n\n"
        "    return add\n"
        "add5 = make_adder(5)\n"
        "box = Box(21)\n"
    )
    result, cap = run(
        shell,
        "%%gpu any\nprint(f(a).sum(), g(1), Box(4).twice(), box.twice(), add5(1), math.sqrt(16))",
    )
    assert result.success, cap.stdout + cap.stderr
    assert "135.0 2 8 42 6 4.0" in cap.stdout


def test_namespace_persists_and_pull_brings_values_back(shell):
    shell.run_cell("import numpy as np\na = np.arange(5.0)")
    result, cap = run(shell, "%%gpu any\nb = a * 2\nc = 'made remotely'")
    assert result.success, cap.stdout
    assert "b" not in shell.user_ns  # b stays on the worker
    result, cap = run(shell, "%%gpu any --pull b\nb.mean()")
    assert result.success, cap.stdout
    assert result.result.data["text/plain"] == "np.float64(4.0)"  # last expression is Out[]
    np.testing.assert_array_equal(shell.user_ns["b"], np.arange(5.0) * 2)
    assert shell.user_ns["b"].flags.writeable  # a pulled value is an ordinary array
    shell.run_cell("%gpu pull c")
    assert shell.user_ns["c"] == "made remotely"


def test_push_sends_a_value_and_local_changes_are_reshipped(shell):
    shell.run_cell("x = 1")
    shell.run_cell("%gpu push x")
    result, cap = run(shell, "%%gpu any\nprint('x is', x)")
    assert "x is 1" in cap.stdout
    shell.run_cell("x = 2")  # changed locally: travels again
    result, cap = run(shell, "%%gpu any\nprint('x is', x)\nx = 100")
    assert "x is 2" in cap.stdout
    # The worker rebound x; the local x did not change, so the worker's value wins.
    result, cap = run(shell, "%%gpu any\nprint('x is', x)")
    assert "x is 100" in cap.stdout


def test_remote_exception_shows_the_remote_traceback_and_fails_the_cell(shell):
    result, cap = run(shell, "%%gpu any\ndef inner():\n    return 1 / 0\ninner()")
    assert not result.success
    assert type(result.error_in_exec).__name__ == "ZeroDivisionError"
    assert "inner()" in plain(cap.stdout) and "division by zero" in plain(cap.stdout)
    assert "jupyter_gpu" not in cap.stdout  # no local machinery in the traceback
    assert any("⏱" in o.data.get("text/plain", "") for o in cap.outputs)  # cost line still shown


def test_unpicklable_variable_stops_the_cell_before_anything_runs(shell):
    shell.run_cell("import threading\nlock = threading.Lock()\nmarker = 0")
    result, cap = run(shell, "%%gpu any\nmarker = 1\nprint(lock)")
    assert not result.success
    err = str(result.error_in_exec)
    assert "'lock'" in err and "_thread.lock" in err and "Nothing was run" in err
    result, cap = run(shell, "%%gpu any\nprint('marker', globals().get('marker'))")
    assert "marker None" in cap.stdout  # the first cell never ran


def test_impossible_request_fails_at_once_listing_the_host(shell):
    result, cap = run(shell, "%%gpu B200\nprint('never')")
    assert not result.success
    msg = str(result.error_in_exec)
    assert "B200" in msg and "H100:1" in msg and "A100-80GB:2" in msg
    result, cap = run(shell, "%%gpu H100:2\nprint('never')")
    assert "cannot provide" in str(result.error_in_exec)
    result, cap = run(shell, "%%gpu H100::\nprint('never')")
    assert "cannot read GPU request" in str(result.error_in_exec)


def test_gpu_assignment_is_pinned_and_cost_line_shows_price(shell):
    result, cap = run(
        shell,
        "%%gpu A100\nimport os\nprint(os.environ['JUPYTER_GPU_DEVICES'], repr(os.environ['CUDA_VISIBLE_DEVICES']))",
    )
    assert result.success, cap.stdout
    assert "A100-80GB:GPU-simulated-0001-A100-80GB ''" in cap.stdout
    cost = [o.data["text/plain"] for o in cap.outputs if "⏱" in o.data.get("text/plain", "")]
    assert cost and cost[0].startswith("⏱ A100-80GB ×1 (simulated)") and "$" in cost[0]
    assert re.fullmatch(r"cold start \d+\.\d\d s", notes(cap)[-1]) and cap.stderr == ""
    import numpy

    magics = shell.magics_manager.registry["GPUMagics"]
    status = magics.client.call(P.Msg.STATUS)
    assert status["sessions"][0]["versions"]["numpy"] == numpy.__version__


def test_worker_killed_mid_cell_gives_a_clear_error_and_the_next_cell_recovers(shell):
    shell.run_cell("%%gpu H100\nkept = 1")
    result, cap = run(shell, "%%gpu H100\nimport os, signal\nprint('before')\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not result.success
    msg = str(result.error_in_exec)
    assert "killed by SIGKILL while running the cell" in msg and "variables defined on the worker are lost" in msg
    result, cap = run(shell, "%%gpu H100\nprint('kept' in globals())")
    assert result.success and "False" in cap.stdout
    assert notes(cap)[0].startswith("the previous worker is gone")
    status = shell.magics_manager.registry["GPUMagics"].client.call(P.Msg.STATUS)
    assert [g["session"] is not None for g in status["gpus"]].count(True) == 1  # the dead worker's GPU came back


def test_cell_timeout_interrupts_and_keeps_the_session(shell):
    shell.run_cell("%%gpu any\nwarm = 'yes'")
    result, cap = run(shell, "%%gpu any --timeout 1\nimport time\ntime.sleep(30)")
    assert not result.success
    assert type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    assert "passed --timeout 1 s" in cap.stderr
    result, cap = run(shell, "%%gpu any\nprint(warm)")
    assert "yes" in cap.stdout


def test_cell_ignoring_interrupt_past_timeout_is_killed(daemon_factory, make_shell):
    d = daemon_factory("--WorkerDaemon.interrupt_grace=1")
    ip = make_shell(d)
    result, cap = run(
        ip, "%%gpu cpu --timeout 1\nimport signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    )
    assert not result.success
    assert "did not stop within 1 s of an interrupt" in str(result.error_in_exec)


def test_idle_release_frees_the_gpu_and_next_cell_starts_fresh(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1", "--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2")
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nremote_only = 42")
    assert result.success
    d.log.wait_for(r"released: it was idle for more than 1 s", timeout=10)
    status = d.client().call(P.Msg.STATUS)
    assert status["sessions"] == [] and status["gpus"][0]["session"] is None
    result, cap = run(ip, "%%gpu H100\nprint('remote_only' in globals())")
    assert "False" in cap.stdout
    assert "idle for more than 1 s" in notes(cap)[0]


def test_queueing_with_one_gpu_and_two_sessions(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1")
    ip = make_shell(d)
    assert ip.run_cell("%%gpu H100\nholder = 1").success  # session A holds the only H100

    other = d.client()
    queued = threading.Event()
    seen: list[P.Message] = []
    outcome: dict = {}

    def on_message(m: P.Message) -> None:
        seen.append(m)
        if m.type == P.Msg.QUEUED:
            queued.set()

    def session_b() -> None:
        msg = P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "print('B ran')"}, "session-b")
        outcome["reply"] = other.request(msg, on_message, timeout=30)

    t = threading.Thread(target=session_b)
    t.start()
    assert queued.wait(10), "session B was not told it is queued"
    assert seen[0].content == {"position": 1, "request": "H100"}

    no_wait = d.client().request  # a third notebook that will not wait
    with pytest.raises(Exception, match="no H100 free right now"):
        no_wait(P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "", "no_wait": True}, "session-c"), timeout=10)

    result, cap = run(ip, "%gpu release")
    assert "released" in cap.stdout
    t.join(30)
    assert outcome["reply"].type == P.Msg.DONE
    texts = [m.content.get("text", "") for m in seen if m.type == P.Msg.STREAM]
    assert "B ran\n" in texts
    assert any(m.type == P.Msg.STARTED for m in seen)


def test_status_and_cost_commands(shell):
    shell.run_cell("%%gpu H100\nx = 1")
    result, cap = run(shell, "%gpu status")
    assert "GPU 0: H100 simulated" in cap.stdout and "(this notebook)" in cap.stdout
    result, cap = run(shell, "%gpu cost")
    assert "cell 1: H100 ×1 (simulated)" in cap.stdout and "cells: 1" in cap.stdout
    result, cap = run(shell, "%gpu frobnicate")
    assert "unknown %gpu command 'frobnicate'" in str(result.error_in_exec)


def test_large_array_travels_through_bulk_path_and_is_writable(shell, daemon):
    shell.run_cell("import numpy as np\nbig = np.ones(4 * 1024 * 1024)")  # 32 MB
    result, cap = run(shell, "%%gpu any\nbig[0] = 5\nprint(big.sum(), big.flags.writeable)")
    assert result.success, cap.stdout
    assert f"{4 * 1024 * 1024 + 4}.0 True" in cap.stdout
    assert shell.user_ns["big"][0] == 1  # the local array is untouched
    session = shell.magics_manager.registry["GPUMagics"].session_id
    assert os.listdir(os.path.join(os.path.dirname(daemon.connection_file), "bulk", session)) == []


def test_daemon_killed_mid_cell_is_reported_and_next_cell_reconnects(daemon_factory, make_shell, tmp_path):
    d = daemon_factory()
    ip = make_shell(d)
    ip.run_cell("%config GPUMagics.heartbeat_interval = 0.5\n%config GPUMagics.heartbeat_timeout = 1.0")
    ip.user_ns.update(dpid=d.proc.pid, pidfile=str(tmp_path / "worker.pid"))
    result, cap = run(
        ip,
        "%%gpu cpu\nimport os, signal, time\nopen(pidfile, 'w').write(str(os.getpid()))\n"
        "os.kill(dpid, signal.SIGKILL)\ntime.sleep(2)",
    )
    assert not result.success
    assert "lost contact with the jupyter-gpu daemon" in str(result.error_in_exec)
    # The orphaned worker notices its daemon is gone and exits by itself.
    worker = os.pidfd_open(int((tmp_path / "worker.pid").read_text()))
    assert select.select([worker], [], [], 15)[0], "the orphaned worker did not exit"
    os.close(worker)
    d2 = daemon_factory()  # the daemon comes back at the same address
    assert d2.connection_file == d.connection_file
    result, cap = run(ip, "%%gpu cpu\nprint('back')")
    assert result.success and "back" in cap.stdout, (result.error_in_exec, cap.stdout)
    assert notes(cap)[0].startswith("the previous worker is gone")


def test_keep_warm_starts_the_next_session_warm(daemon_factory, make_shell, backend_args):
    d = daemon_factory("--simulate-gpus=H100:2", "--WorkerDaemon.keep_warm=H100=1", *backend_args)
    d.log.wait_for(r"warm H100 worker ready", timeout=30)
    status = d.client().call(P.Msg.STATUS)
    assert [g["warm"] for g in status["gpus"]] == [True, False] and status["warm"][0]["device"] == "H100"
    ip = make_shell(d)
    ip.run_cell("import numpy as np\nbig = np.ones(1 << 18)")  # 2 MB: the bulk path, across worker ids
    result, cap = run(ip, "%%gpu H100 --pull twice\nprint('sum', big.sum())\ntwice = big * 2")
    assert result.success, cap.stdout
    assert re.fullmatch(r"warm start \d+\.\d\d s", notes(cap)[-1])
    assert f"sum {float(1 << 18)}" in cap.stdout and ip.user_ns["twice"][0] == 2.0
    d.log.wait_for(r"warm H100 worker ready", timeout=30, nth=2)  # the pool refills on the other H100
    result, cap = run(ip, "%gpu status")
    assert "warm pool: H100 warm" in cap.stdout and "(this notebook)" in cap.stdout


def test_a_queued_cells_waiting_line_becomes_its_cost_line(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1")
    holder = d.client()
    hold = P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "1"}, "holder")
    assert holder.request(hold, timeout=30).content["ok"]  # another notebook holds the only H100
    ip = make_shell(d)

    def release_once_queued() -> None:
        deadline = time.monotonic() + 30
        while not holder.call(P.Msg.STATUS)["queue"] and time.monotonic() < deadline:
            select.select([], [], [], 0.05)  # polling a state, not a synchronisation
        holder.call(P.Msg.RELEASE, session="holder")

    t = threading.Thread(target=release_once_queued)
    t.start()
    result, cap = run(ip, "%%gpu H100\nprint('ran')")
    t.join(30)
    assert result.success and cap.stdout == "ran\n" and cap.stderr == ""
    waiting, last = cap.outputs[0], cap.outputs[-1]
    assert waiting.data["text/plain"] == "[jupyter-gpu] waiting for H100: 1st in queue"
    assert last.update and last.data["text/plain"].startswith("⏱ H100 ×1 (simulated) · ")  # the same line, updated
    assert len(cap.outputs) == 2  # nothing else from the extension
    said = notes(cap)  # a wait of under 0.05 s is not worth a note, so it may be absent
    assert re.fullmatch(r"cold start \d+\.\d\d s", said[-1]) and all(
        re.fullmatch(r"waited \d+\.\d s in the queue", n) for n in said[:-1]
    ), said
