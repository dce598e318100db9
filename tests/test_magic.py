"""%%gpu in a real InteractiveShell against a real daemon subprocess."""

from __future__ import annotations

import os
import re
import select
import threading
import time

import numpy as np
import pytest
from support import kernels
from support.bulk_spy import spy_on_bulk
from support.shells import notes, plain, run

from kernel_worker import protocol as P
from kernel_worker.ledger import DEFAULT_PRICES


def iopub_until(kc, msg_id: str, done, timeout: float = kernels.KERNEL_TIMEOUT) -> list[dict]:
    """A real kernel's iopub messages for request ``msg_id``, up to the first that ``done``
    accepts (an event, however long it takes within ``timeout``)."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        m = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))  # queue.Empty past the deadline
        if m["parent_header"].get("msg_id") == msg_id:
            seen.append(m)
            if done(m):
                return seen


def kernel_error(kc, code: str) -> str:
    """Run ``code`` in a real kernel that must fail it; the error as the notebook shows it."""
    reply = kc.execute_interactive(code, timeout=kernels.KERNEL_TIMEOUT)
    assert reply["content"]["status"] == "error", reply["content"]
    return f"{reply['content']['ename']}: {reply['content']['evalue']}"


def test_closures_of_each_kind_travel_with_the_cell(shell):
    setup = shell.run_cell(
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
    assert setup.success
    result, cap = run(
        shell,
        "%%gpu any\nprint(f(a).sum(), g(1), Box(4).twice(), box.twice(), add5(1), math.sqrt(16))",
    )
    assert result.success, cap.stdout + cap.stderr
    assert cap.stdout == "135.0 2 8 42 6 4.0\n"


def test_namespace_persists_and_pull_brings_values_back(shell):
    assert shell.run_cell("import numpy as np\na = np.arange(5.0)").success
    result, cap = run(shell, "%%gpu any\nb = a * 2\nc = 'made remotely'")
    assert result.success, cap.stdout
    assert "b" not in shell.user_ns  # b stays on the worker
    result, cap = run(shell, "%%gpu any --pull b\nb.mean()")
    assert result.success, cap.stdout
    assert result.result.data["text/plain"] == "np.float64(4.0)"  # last expression is Out[]
    np.testing.assert_array_equal(shell.user_ns["b"], np.arange(5.0) * 2)
    assert shell.user_ns["b"].flags.writeable  # a pulled value is an ordinary array
    assert shell.run_cell("%gpu pull c").success
    assert shell.user_ns["c"] == "made remotely"


def test_push_sends_a_value_and_local_changes_are_reshipped(shell):
    assert shell.run_cell("x = 1").success
    assert shell.run_cell("%gpu push x").success
    result, cap = run(shell, "%%gpu any\nprint('x is', x)")
    assert result.success and cap.stdout == "x is 1\n"
    assert shell.run_cell("x = 2").success  # changed locally: travels again
    result, cap = run(shell, "%%gpu any\nprint('x is', x)\nx = 100")
    assert result.success and cap.stdout == "x is 2\n"
    # The worker rebound x; the local x did not change, so the worker's value wins.
    result, cap = run(shell, "%%gpu any\nprint('x is', x)")
    assert result.success and cap.stdout == "x is 100\n"
    assert shell.user_ns["x"] == 2


def test_remote_exception_shows_the_remote_traceback_and_fails_the_cell(shell):
    result, cap = run(shell, "%%gpu any\ndef inner():\n    return 1 / 0\ninner()")
    assert not result.success
    assert type(result.error_in_exec).__name__ == "ZeroDivisionError"
    assert "inner()" in plain(cap.stdout) and "division by zero" in plain(cap.stdout)
    assert "jupyter_gpu" not in cap.stdout  # no local machinery in the traceback
    assert any("⏱" in o.data.get("text/plain", "") for o in cap.outputs)  # cost line still shown


def test_unpicklable_variable_stops_the_cell_before_anything_runs(shell):
    assert shell.run_cell("import threading\nlock = threading.Lock()\nmarker = 0").success
    result, cap = run(shell, "%%gpu any\nmarker = 1\nprint(lock)")
    assert not result.success
    err = str(result.error_in_exec)
    assert "'lock'" in err and "_thread.lock" in err and "Nothing was run" in err
    result, cap = run(shell, "%%gpu any\nprint('marker', globals().get('marker'))")
    assert result.success and cap.stdout == "marker None\n"  # the first cell never ran


def test_impossible_request_fails_at_once_listing_the_host(shell):
    result, cap = run(shell, "%%gpu B200\nprint('never')")
    assert not result.success
    msg = str(result.error_in_exec)
    assert "B200" in msg and "H100:1" in msg and "A100-80GB:2" in msg
    result, cap = run(shell, "%%gpu H100:2\nprint('never')")
    assert not result.success and "cannot provide" in str(result.error_in_exec)
    result, cap = run(shell, "%%gpu H100::\nprint('never')")
    assert not result.success and "cannot read GPU request" in str(result.error_in_exec)
    assert "never" not in cap.stdout


def test_gpu_assignment_is_pinned_and_cost_line_shows_price(shell):
    result, cap = run(
        shell,
        "%%gpu A100\nimport os\nprint(os.environ['JUPYTER_GPU_DEVICES'], repr(os.environ['CUDA_VISIBLE_DEVICES']))",
    )
    assert result.success, cap.stdout
    assert cap.stdout == "A100-80GB:GPU-simulated-0001-A100-80GB ''\n"
    [line] = [o for o in cap.outputs if "⏱" in o.data.get("text/plain", "")]
    c = line.metadata["jupyter_gpu"]["cost"]
    # The A100-80GB's list price, billed for the cell's wall time: a figure, not "no price set".
    price = DEFAULT_PRICES["A100-80GB"]
    assert c["price_per_hour"] == price and c["count"] == 1 and c["simulated"] is True
    assert c["usd"] == pytest.approx(price * c["wall_s"] / 3600, rel=1e-9) and c["usd"] > 0
    assert c["session_usd"] == pytest.approx(price * c["session_held_s"] / 3600, rel=1e-9)
    [cold] = notes(cap)
    assert re.fullmatch(r"cold start \d+\.\d\d s", cold) and cap.stderr == ""
    expected = [f"⏱ A100-80GB ×1 (simulated) · {c['wall_s']:.2f} s · ${c['usd']:.4f}"]
    assert c["mean_util"] is None and c["peak_memory_bytes"] is None and c["energy_j"] is None
    expected.append("no reading")  # a simulated GPU has no readings, and none are made up
    session = f"session ${c['session_usd']:.4f}"
    if c["session_idle_s"] >= 1:  # a slow cold start counts as warm idle time
        session += f" (warm idle {c['session_idle_s']:.0f} s, ${c['session_idle_usd']:.4f})"
    assert line.data["text/plain"] == " · ".join([*expected, session, cold])
    import numpy

    magics = shell.magics_manager.registry["GPUMagics"]
    status = magics.client.call(P.Msg.STATUS)
    assert status["sessions"][0]["versions"]["numpy"] == numpy.__version__


def test_worker_killed_mid_cell_gives_a_clear_error_and_the_next_cell_recovers(shell):
    assert shell.run_cell("%%gpu H100\nkept = 1").success
    result, cap = run(shell, "%%gpu H100\nimport os, signal\nprint('before')\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not result.success
    msg = str(result.error_in_exec)
    assert "killed by SIGKILL while running the cell" in msg and "variables defined on the worker are lost" in msg
    result, cap = run(shell, "%%gpu H100\nprint('kept' in globals())")
    assert result.success and cap.stdout == "False\n"
    assert notes(cap)[0].startswith("the previous worker is gone")
    status = shell.magics_manager.registry["GPUMagics"].client.call(P.Msg.STATUS)
    assert [g["session"] is not None for g in status["gpus"]].count(True) == 1  # the dead worker's GPU came back


def test_cell_timeout_interrupts_and_keeps_the_session(shell):
    assert shell.run_cell("%%gpu any\nwarm = 'yes'").success
    result, cap = run(shell, "%%gpu any --timeout 1\nimport time\ntime.sleep(30)")
    assert not result.success
    assert type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    assert "passed --timeout 1 s" in cap.stderr
    result, cap = run(shell, "%%gpu any\nprint(warm)")
    assert result.success and cap.stdout == "yes\n"


def test_cell_ignoring_interrupt_past_timeout_is_killed(daemon_factory, make_shell):
    d = daemon_factory("--WorkerDaemon.interrupt_grace=1")
    ip = make_shell(d)
    result, cap = run(
        ip, "%%gpu cpu --timeout 1\nimport signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    )
    assert not result.success
    assert "did not stop within 1 s of an interrupt" in str(result.error_in_exec)


@pytest.mark.parametrize("snapshots", [True, False], ids=["snapshot", "no-snapshot"])
def test_idle_release_frees_the_gpu_and_next_cell_restores_or_starts_fresh(daemon_factory, make_shell, snapshots):
    d = daemon_factory(
        "--simulate-gpus=H100:1",
        "--idle-timeout=1",
        "--WorkerDaemon.reap_interval=0.2",
        f"--Snapshots.on_idle_release={snapshots}",
    )
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nremote_only = 42")
    assert result.success
    d.log.wait_for(r"released: it was idle for more than 1 s", timeout=10)
    status = d.client().call(P.Msg.STATUS)
    assert status["sessions"] == [] and status["gpus"][0]["session"] is None
    result, cap = run(ip, "%%gpu H100\nprint('remote_only' in globals())")
    assert result.success and cap.stdout == f"{snapshots}\n"
    if snapshots:
        assert notes(cap)[0].startswith("restored 1 name (remote_only) (")
    else:
        assert "idle for more than 1 s" in notes(cap)[0]


def test_queueing_with_one_gpu_and_two_notebooks(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1")
    ip = make_shell(d)
    assert ip.run_cell("%%gpu H100\nholder = 1").success  # notebook A holds the only H100

    # Notebooks B and C: real kernels, each with its own session on the same daemon.
    with kernels.kernel(d.connection_file) as (_, b), kernels.kernel(d.connection_file) as (_, c):
        cell_b = b.execute("%%gpu H100\nprint('B ran')")
        # What B's user sees while it waits: one line, its place in the queue.
        queued = iopub_until(b, cell_b, lambda m: m["msg_type"] in ("display_data", "stream", "error"))[-1]
        assert queued["msg_type"] == "display_data", queued
        assert queued["content"]["data"] == {"text/plain": "[jupyter-gpu] waiting for H100: 1st in queue"}
        line_id = queued["content"]["transient"]["display_id"]

        # A notebook that will not wait is told so at once, and does not join the queue.
        assert kernel_error(c, "%%gpu H100 --no-wait\nprint('never')") == (
            "GPUCellError: no H100 free right now (held by 1 other session(s)); drop --no-wait to queue for it"
        )

        time.sleep(0.2)  # a lower bound on B's wait, so that it earns its note: not a synchronisation
        result, cap = run(ip, "%gpu release")
        assert result.success and "released" in cap.stdout
        seen = iopub_until(b, cell_b, lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "idle")
        reply = b.get_shell_msg(timeout=kernels.KERNEL_TIMEOUT)
        assert reply["parent_header"]["msg_id"] == cell_b and reply["content"]["status"] == "ok"
        streams = [m["content"]["text"] for m in seen if m["msg_type"] == "stream"]
        assert streams == ["B ran\n"]
        # The queue line became B's cost line, in place.
        [cost] = [m["content"] for m in seen if m["msg_type"] in ("display_data", "update_display_data")]
        assert cost["transient"]["display_id"] == line_id
        assert cost["data"]["text/plain"].startswith("⏱ H100 ×1 (simulated) · ")
        waited, cold = cost["metadata"]["jupyter_gpu"]["notes"]
        assert float(re.fullmatch(r"waited (\d+\.\d) s in the queue", waited)[1]) >= 0.2
        assert re.fullmatch(r"cold start \d+\.\d\d s", cold)
        assert cost["data"]["text/plain"].endswith(f" · {waited} · {cold}")


def test_status_and_cost_commands(shell):
    assert shell.run_cell("%%gpu H100\nx = 1").success
    result, cap = run(shell, "%gpu status")
    assert "GPU 0: H100 simulated" in cap.stdout and "(this notebook)" in cap.stdout
    result, cap = run(shell, "%gpu cost")
    assert "cell 1: H100 ×1 (simulated)" in cap.stdout and "cells: 1" in cap.stdout
    result, cap = run(shell, "%gpu frobnicate")
    assert not result.success and "unknown %gpu command 'frobnicate'" in str(result.error_in_exec)


def test_large_array_travels_through_bulk_path_and_is_writable(shell, daemon, monkeypatch):
    spy = spy_on_bulk(monkeypatch)
    assert shell.run_cell("import numpy as np\nbig = np.ones(4 * 1024 * 1024)").success  # 32 MB
    result, cap = run(shell, "%%gpu any --pull back\nbig[0] = 5\nprint(big.sum(), big.flags.writeable)\nback = big")
    assert result.success, cap.stdout
    assert cap.stdout == f"{4 * 1024 * 1024 + 4}.0 True\n"
    assert shell.user_ns["big"][0] == 1  # the local array is untouched
    assert shell.user_ns["back"][0] == 5 and shell.user_ns["back"].flags.writeable
    # Both ways through a bulk file in this session's directory, never inline: the notebook
    # wrote the array's 32 MB there (and sent an empty frame in its place), and mapped the
    # pulled one in from there.
    session = shell.magics_manager.registry["GPUMagics"].session_id
    bulk_dir = os.path.join(os.path.dirname(daemon.connection_file), "bulk", session)
    size = 4 * 1024 * 1024 * 8
    assert [(f["dir"], f["size"], f["on_disk"]) for f in spy.sent] == [(bulk_dir, size, size)]
    assert [(f["dir"], f["size"]) for f in spy.received] == [(bulk_dir, size)]
    assert os.listdir(bulk_dir) == []  # every bulk file was read and removed


def test_daemon_killed_mid_cell_is_reported_and_next_cell_reconnects(daemon_factory, make_shell, tmp_path):
    # A worker waits orphan_timeout for a restarted daemon to adopt it (test_restart.py);
    # here nobody comes back within 1 s, so it ends by itself.
    orphan = "--ProcessBackend.orphan_timeout=1"
    d = daemon_factory(orphan)
    ip = make_shell(d)
    # A ping after 0.5 s of silence; 5 s without its pong is a daemon lost (a loaded machine
    # may answer slowly, never that slowly).
    assert ip.run_cell("%config GPUMagics.heartbeat_interval = 0.5\n%config GPUMagics.heartbeat_timeout = 5.0").success
    ip.user_ns.update(dpid=d.proc.pid, pidfile=str(tmp_path / "worker.pid"))
    result, cap = run(
        ip,
        "%%gpu cpu\nimport os, signal, time\nopen(pidfile, 'w').write(str(os.getpid()))\n"
        "os.kill(dpid, signal.SIGKILL)\ntime.sleep(2)",
    )
    assert not result.success
    assert str(result.error_in_exec).startswith(f"lost contact with the jupyter-gpu daemon at {d.url}: no answer for ")
    # The orphaned worker notices its daemon is gone and exits by itself.
    try:
        worker = os.pidfd_open(int((tmp_path / "worker.pid").read_text()))
    except ProcessLookupError:
        pass  # gone already
    else:
        assert select.select([worker], [], [], 30)[0], "the orphaned worker did not exit"
        os.close(worker)
    d2 = daemon_factory(orphan)  # the daemon comes back at the same address
    assert d2.connection_file == d.connection_file
    result, cap = run(ip, "%%gpu cpu\nprint('back')")
    assert result.success and cap.stdout == "back\n", (result.error_in_exec, cap.stdout)
    assert notes(cap)[0].startswith("the previous worker is gone")


def test_keep_warm_starts_the_next_session_warm(daemon_factory, make_shell, backend_args, monkeypatch):
    d = daemon_factory("--simulate-gpus=H100:2", "--WorkerDaemon.keep_warm=H100=1", *backend_args)
    d.log.wait_for(r"warm H100 worker ready", timeout=30)
    status = d.client().call(P.Msg.STATUS)
    assert [g["warm"] for g in status["gpus"]] == [True, False] and status["warm"][0]["device"] == "H100"
    ip = make_shell(d)
    spy = spy_on_bulk(monkeypatch)
    assert ip.run_cell("import numpy as np\nbig = np.ones(1 << 18)").success  # 2 MB: the bulk path, across worker ids
    result, cap = run(ip, "%%gpu H100 --pull twice\nprint('sum', big.sum())\ntwice = big * 2")
    assert result.success, cap.stdout
    assert [n for n in notes(cap) if n.startswith(("warm start", "cold start"))] == [notes(cap)[0]]
    assert re.fullmatch(r"warm start \d+\.\d\d s", notes(cap)[0])
    assert cap.stdout == f"sum {float(1 << 18)}\n" and ip.user_ns["twice"][0] == 2.0
    # Into the warm worker (whose id is not the session's) and back, through bulk files.
    assert spy.sizes_sent() == [8 << 18] and spy.sizes_received() == [8 << 18]
    d.log.wait_for(r"warm H100 worker ready", timeout=30, nth=2)  # the pool refills on the other H100
    result, cap = run(ip, "%gpu status")
    assert "warm pool: H100 warm" in cap.stdout and "(this notebook)" in cap.stdout


def test_a_queued_cells_waiting_line_becomes_its_cost_line(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1")
    with kernels.kernel(d.connection_file, "%%gpu H100\n1") as (_, holder):  # another notebook holds the only H100
        ip = make_shell(d)
        observer = d.client()
        released: dict = {}

        def release_once_queued() -> None:
            deadline = time.monotonic() + 60
            while not observer.call(P.Msg.STATUS)["queue"] and time.monotonic() < deadline:
                select.select([], [], [], 0.05)  # polling a state, not a synchronisation
            time.sleep(0.2)  # a lower bound on the queued cell's wait, so that it earns its note
            released["out"] = kernels.run(holder, "%gpu release")

        t = threading.Thread(target=release_once_queued)
        t.start()
        result, cap = run(ip, "%%gpu H100\nprint('ran')")
        t.join(60)
    assert released["out"][1] == "ok" and "released" in released["out"][0]
    assert result.success and cap.stdout == "ran\n" and cap.stderr == ""
    waiting, last = cap.outputs[0], cap.outputs[-1]
    assert waiting.data["text/plain"] == "[jupyter-gpu] waiting for H100: 1st in queue"
    assert last.update and last.data["text/plain"].startswith("⏱ H100 ×1 (simulated) · ")  # the same line, updated
    assert len(cap.outputs) == 2  # nothing else from the extension
    waited, cold = notes(cap)
    assert float(re.fullmatch(r"waited (\d+\.\d) s in the queue", waited)[1]) >= 0.2
    assert re.fullmatch(r"cold start \d+\.\d\d s", cold)
    assert last.data["text/plain"].endswith(f" · {waited} · {cold}")
