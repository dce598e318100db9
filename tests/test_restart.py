"""Nothing lost when the daemon restarts or a kernel goes away: a cell runs on through a
daemon killed with SIGKILL and its output arrives whole; a request the new daemon cannot
answer ends at once with a clear message; a kernel that dies leaves its session detached
(its cell running), released after orphan_grace, and another kernel can attach to it."""

from __future__ import annotations

import signal
import threading

from support.files import wait_for_file
from support.kernels import kernel, kill
from support.kernels import run as krun
from support.orphans import worker_pids
from support.shells import run

# The cell kills its daemon, writes while it is away, waits for the restarted one (its
# connection file names a new pid) and writes again.
THROUGH_A_RESTART = (
    "%%gpu any\nimport os, signal, json, time\n"
    "print('before', flush=True)\n"
    "os.kill(dpid, signal.SIGKILL)\n"
    "for i in range(3): print('while away', i, flush=True)\n"
    "deadline = time.monotonic() + 120\n"
    "while json.load(open(cf))['pid'] == dpid and time.monotonic() < deadline: time.sleep(0.02)\n"
    "print('after', flush=True)\n"
    "x = 'made before the restart'"
)


def _restart_when_killed(d, daemon_factory, *args: str) -> dict:
    """Start the daemon again as soon as the cell has killed it (a thread)."""
    box: dict = {}

    def restart() -> None:
        if d.proc.wait(120) == -signal.SIGKILL:  # the cell killed it (not the test's teardown)
            box["daemon"] = daemon_factory(*args)

    threading.Thread(target=restart, daemon=True).start()
    return box


def test_a_cell_runs_on_through_a_daemon_restart_and_loses_no_output(daemon_factory, make_shell):
    d = daemon_factory()
    ip = make_shell(d)
    ip.run_cell("%config GPUMagics.heartbeat_timeout = 60")  # generous: a loaded machine restarts slowly
    ip.user_ns.update(dpid=d.proc.pid, cf=d.connection_file)
    box = _restart_when_killed(d, daemon_factory)
    result, cap = run(ip, THROUGH_A_RESTART)
    assert result.success, (cap.stdout, cap.stderr, result.error_in_exec)
    assert cap.stdout == "before\nwhile away 0\nwhile away 1\nwhile away 2\nafter\n"
    assert "daemon" in box
    box["daemon"].log.wait_for(r"adopted the running worker of session", timeout=5)
    # The same worker, adopted: what the cell made is there.
    result, cap = run(ip, "%%gpu any\nprint(x)")
    assert result.success and cap.stdout == "made before the restart\n", (cap.stdout, result.error_in_exec)


def test_a_cell_that_ends_while_the_daemon_is_away_is_answered_by_the_next_daemon(
    daemon_factory, make_shell, backend_args, tmp_path
):
    d = daemon_factory(*backend_args)
    ip = make_shell(d)
    ip.run_cell("%config GPUMagics.heartbeat_timeout = 60")
    # Markers in the session's bulk directory, which host and container both see.
    marks = tmp_path / "bulk" / ip.magics_manager.registry["GPUMagics"].session_id
    box: dict = {}

    def kill_then_restart() -> None:
        wait_for_file(marks / "running")
        d.kill()
        (marks / "running").unlink()  # the cell goes on while no daemon is there
        wait_for_file(marks / "ended")
        box["daemon"] = daemon_factory(*backend_args)

    threading.Thread(target=kill_then_restart, daemon=True).start()
    result, cap = run(
        ip,
        "%%gpu any\nimport os, time\nmarks = os.environ['JUPYTER_GPU_BULK_DIR']\nprint('before', flush=True)\n"
        "open(os.path.join(marks, 'running'), 'w').close()\n"
        "deadline = time.monotonic() + 120\n"
        "while os.path.exists(os.path.join(marks, 'running')) and time.monotonic() < deadline: time.sleep(0.02)\n"
        "for i in range(200): print('line', i)\ny = 7\nopen(os.path.join(marks, 'ended'), 'w').close()",
    )
    assert result.success, (cap.stdout[-500:], cap.stderr, result.error_in_exec)
    assert cap.stdout == "before\n" + "".join(f"line {i}\n" for i in range(200))
    assert "daemon" in box
    cost = [o for o in cap.outputs if "jupyter_gpu" in (o.metadata or {})]
    assert len(cost) == 1 and "⏱ cpu" in cost[0].data["text/plain"]
    result, cap = run(ip, "%%gpu any\nprint(y)")
    assert result.success and cap.stdout == "7\n", (cap.stdout, result.error_in_exec)


def test_a_request_the_restarted_daemon_cannot_answer_ends_at_once(daemon_factory, make_shell):
    d = daemon_factory()
    ip = make_shell(d)
    ip.run_cell("%config GPUMagics.heartbeat_timeout = 60")
    ip.run_cell("a = 41")
    ip.user_ns.update(dpid=d.proc.pid)
    box = _restart_when_killed(d, daemon_factory)
    # The worker dies too, while no daemon watches: the new daemon cannot know the cell.
    result, cap = run(ip, "%%gpu any\nimport os, signal\nos.kill(dpid, signal.SIGKILL)\nos._exit(1)")
    assert not result.success
    err = str(result.error_in_exec)
    assert "the jupyter-gpu daemon at ipc://" in err and "restarted" in err, err
    assert "will not answer this execute: session" in err and "Run it again" in err, err
    assert "daemon" in box
    result, cap = run(ip, "%%gpu any\nprint(a)")  # the notebook's variables travel to a fresh worker
    assert result.success and cap.stdout.endswith("41\n"), (cap.stdout, result.error_in_exec)


def test_a_dead_kernel_s_idle_session_is_released_after_orphan_grace(daemon_factory):
    d = daemon_factory(
        "--WorkerDaemon.client_timeout=2", "--WorkerDaemon.orphan_grace=1", "--WorkerDaemon.reap_interval=0.2"
    )
    with kernel(d.connection_file, "%config GPUMagics.keepalive_interval = 0.5") as (km, kc):
        out, status = krun(kc, "%%gpu any\nimport os\nprint(os.getpid())")
        assert status == "ok", out
        sid, _ = krun(kc, "print(get_ipython().magics_manager.registry['GPUMagics'].session_id)")
        assert worker_pids(d.connection_file) == [int(out.strip())]
        kill(km)
        d.log.wait_for(rf"session {sid.strip()} released: its notebook's kernel went away", timeout=60)
    assert worker_pids(d.connection_file) == []


def test_another_kernel_attaches_to_a_dead_kernel_s_running_cell(daemon_factory, make_shell, tmp_path):
    d = daemon_factory(
        "--WorkerDaemon.client_timeout=2", "--WorkerDaemon.orphan_grace=1", "--WorkerDaemon.reap_interval=0.2"
    )
    go = tmp_path / "go"
    with kernel(d.connection_file, "%config GPUMagics.keepalive_interval = 0.5") as (km, kc):
        sid = krun(kc, "print(get_ipython().magics_manager.registry['GPUMagics'].session_id)")[0].strip()
        msg_id = kc.execute(
            "%%gpu any\nimport os, time\nmade = 'on the worker'\nprint('part 1', flush=True)\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\nprint('part 2')"
        )
        while True:  # until the remote cell runs
            m = kc.get_iopub_msg(timeout=120)
            if m["parent_header"].get("msg_id") == msg_id and "part 1" in m["content"].get("text", ""):
                break
        kill(km)
    d.log.wait_for(rf"session {sid} detached", timeout=30)  # the cell runs on: not released
    ip = make_shell(d)

    def release_the_cell() -> None:
        d.log.wait_for(rf"session {sid} attached by another kernel", timeout=120)
        go.touch()

    threading.Thread(target=release_the_cell, daemon=True).start()
    result, cap = run(ip, f"%gpu attach {sid}")
    assert result.success, str(result.error_in_exec)
    assert cap.stdout == "part 1\npart 2\n"  # replayed, then live
    assert f"attached to session {sid}" in cap.outputs[0].data["text/plain"]
    result, cap = run(ip, "%%gpu any --pull made\nprint(made)")  # the worker's variables are this kernel's now
    assert result.success and cap.stdout == "on the worker\n", (cap.stdout, result.error_in_exec)
    assert ip.user_ns["made"] == "on the worker"


def test_attach_to_a_hostile_or_unknown_name_is_refused_and_touches_nothing(daemon_factory, make_shell):
    from jupyter_gpu.client import DaemonError
    from kernel_worker import protocol as P

    d = daemon_factory()
    ip = make_shell(d)
    assert run(ip, "%%gpu any\nkept = 'here'")[0].success
    result, _ = run(ip, "%gpu attach ../x")  # refused before it is sent
    assert (
        not result.success and str(result.error_in_exec) == "usage: %gpu attach [SESSION]; '../x' is not a session id"
    )
    client = d.client()
    for name in ("..", "../x", "a/b", "x" * 500, "nobody-has-this"):
        try:
            client.call(P.Msg.ATTACH, {"session": name}, session="other", timeout=10)
            raise AssertionError(f"attach to {name!r} was accepted")
        except DaemonError as e:
            assert e.code == P.Err.NO_SESSION, e.code
            assert str(e).startswith(f"you have no session {name[:40]!r} on this daemon"), str(e)
    result, cap = run(ip, "%%gpu any\nprint(kept)")  # the notebook's session is untouched
    assert result.success and cap.stdout == "here\n"
