"""The kill -9 matrix (issue #12, requirement 6): each part of the path a `%%gpu` cell
takes (the notebook's kernel, the daemon, the worker process, its docker container, the
SSH tunnel) is killed with SIGKILL while its session is idle and while a cell runs. Each
case checks what the user sees, that output printed before the fault is still there, that
the simulated H100 is back in the pool within GPU_BACK_S (or, where the session rightly
keeps it, that it still holds it), that no worker process or container is left behind,
and that the next cell works with the notebook's variables (``a = 41``).

Left out, because they cannot happen here: a container fault on the process backend (it
has none) and a tunnel fault on the docker backend (the SSH daemon runs as on another
host, in a mount namespace of its own; the docker engine of the tests is on this host).
The worker process is killed on the process backend; on the docker backend the worker is
the container, killed with `docker kill`."""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import threading
import time

import pytest
from IPython.utils.capture import capture_output
from support.daemons import docker_args
from support.files import wait_for_file
from support.kernels import kernel
from support.kernels import kill as kill_kernel
from support.kernels import run as krun
from support.orphans import stop_workers, worker_pids
from support.shells import notes, plain
from support.sshd_server import connect_line, connection_processes, elsewhere_daemon, sshd_server

from kernel_worker import protocol as P
from kernel_worker.backends.docker import LABEL_SESSION

PHASES = ["idle", "running"]
H100 = "--simulate-gpus=H100:1"
# A kernel silent for 2 s is gone; its idle session goes 1 s later; the reaper looks every 0.2 s.
KERNEL_GONE = ("--WorkerDaemon.client_timeout=2", "--WorkerDaemon.orphan_grace=1", "--WorkerDaemon.reap_interval=0.2")
GPU_BACK_S = 10.0  # from the fault (or, for a dead kernel's running cell, from the cell's end) to a free H100
KERNEL_GPU_BACK_S = 2 + 1 + GPU_BACK_S  # client_timeout + orphan_grace + the bound above
WAIT_S = 120.0  # how long an event may take on a loaded machine (not a bound under test)

# A cell that prints a line (flushed) naming its worker's pid, then waits for `go` in its
# session's bulk directory (which host and container both see) and ends.
RUNNING = (
    "%%gpu H100\nimport os, time\nmarks = os.environ['JUPYTER_GPU_BULK_DIR']\n"
    "print('before', os.getpid(), flush=True)\n"
    f"deadline = time.monotonic() + {WAIT_S}\n"
    "while not os.path.exists(os.path.join(marks, 'go')) and time.monotonic() < deadline: time.sleep(0.02)\n"
    "print('after', flush=True)\nmade = 'in the cell'"
)
BEFORE = re.compile(r"^before (\d+)\n")


class Watched(io.StringIO):
    """A notebook's stdout that says when a line the cell printed has arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.before = threading.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if BEFORE.match(self.getvalue()):
            self.before.set()
        return n


def run_faulting(ip, cell: str, fault) -> tuple:
    """Run ``cell``; once its first line has reached the notebook, ``fault(pid)`` runs in a
    thread (pid: the worker's, as the cell printed it). (result, captured, fault's errors)."""
    watched, errors = Watched(), []

    def inject() -> None:
        try:
            assert watched.before.wait(WAIT_S), "the cell printed nothing"
            fault(int(BEFORE.match(watched.getvalue()).group(1)))
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)

    t = threading.Thread(target=inject, daemon=True)
    t.start()
    with capture_output() as cap:
        inner, sys.stdout = sys.stdout, watched
        try:
            result = ip.run_cell(cell, store_history=True)
        finally:
            sys.stdout = inner
            inner.write(watched.getvalue())
    t.join(WAIT_S)
    return result, cap, errors


def run(ip, cell: str) -> tuple:
    with capture_output() as cap:
        result = ip.run_cell(cell, store_history=True)
    return result, cap


def session_of(ip) -> str:
    return ip.magics_manager.registry["GPUMagics"].session_id


def holder(d) -> str | None:
    """The session holding the daemon's one H100, from its STATUS reply."""
    return d.client().call(P.Msg.STATUS)["gpus"][0]["session"]


def containers(engine, session: str) -> list:
    return engine.client.containers.list(all=True, filters={"label": f"{LABEL_SESSION}={session}"})


def leftovers(d, engine, session: str) -> list:
    """Worker processes (process backend) or containers (docker) the session left."""
    return containers(engine, session) if engine is not None else worker_pids(d.connection_file)


def released(d, session: str, why: str, bound: float) -> None:
    d.log.wait_for(rf"session {session} released: {why}", timeout=bound)


def adopted(d, session: str) -> None:
    """Until the restarted daemon has adopted the session (its worker may not have
    reconnected yet: a cell sent now waits for it)."""
    d.log.wait_for(rf"adopted the running worker of session {session}", timeout=WAIT_S)


def next_cell_sees_the_notebook(ip, extra: str = "") -> str:
    """The notebook's ``a`` reaches the next cell's worker; what that cell printed."""
    ip.user_ns["a"] = 41
    result, cap = run(ip, f"%%gpu H100\nprint(a{extra})")
    assert result.success, (cap.stdout, cap.stderr, result.error_in_exec)
    assert cap.stdout.startswith("41"), cap.stdout
    return cap


def release_leaves_nothing(ip, d, engine) -> None:
    s = session_of(ip)
    assert run(ip, "%gpu release")[0].success
    assert holder(d) is None
    assert leftovers(d, engine, s) == []


@pytest.fixture
def engine_or_none(backend_args, request):
    return request.getfixturevalue("engine") if backend_args else None


# ---------------------------------------------------------------------------- the daemon


@pytest.mark.parametrize("phase", PHASES)
def test_daemon_killed(phase, backend_args, engine_or_none, daemon_factory, make_shell, tmp_path):
    args = (H100, *backend_args)
    d = daemon_factory(*args)
    ip = make_shell(d)
    ip.run_cell("%config GPUMagics.heartbeat_timeout = 60")  # a restart on a loaded machine is slow
    assert ip.run_cell("%%gpu H100\nx = 'made before the fault'").success
    s = session_of(ip)
    box: dict = {}
    if phase == "idle":
        d.kill()
        assert len(leftovers(d, engine_or_none, s)) == 1  # the worker outlives its daemon, to be adopted
        box["daemon"] = daemon_factory(*args)
        adopted(box["daemon"], s)
    else:

        def fault(pid: int) -> None:
            d.kill()
            box["daemon"] = daemon_factory(*args)
            adopted(box["daemon"], s)
            (tmp_path / "bulk" / s / "go").touch()

        result, cap, errors = run_faulting(ip, RUNNING, fault)
        assert not errors, errors
        # The user sees nothing of the fault: the cell runs on and its output arrives whole.
        assert result.success, (cap.stdout, cap.stderr, result.error_in_exec)
        assert BEFORE.match(cap.stdout) and cap.stdout.endswith("\nafter\n"), cap.stdout
        assert cap.stderr == ""
    d2 = box["daemon"]
    assert holder(d2) == s  # the adopted session keeps its GPU: nothing to give back
    assert len(leftovers(d2, engine_or_none, s)) == 1  # the same worker, no second one
    cap = next_cell_sees_the_notebook(ip, ", x" + (", made" if phase == "running" else ""))
    assert cap.stdout == "41 made before the fault" + (" in the cell" if phase == "running" else "") + "\n"
    release_leaves_nothing(ip, d2, engine_or_none)


# ---------------------------------------------------------------------------- the worker


def worker_killed(phase: str, d, ip, why: str, kill, leftover) -> None:
    """A session's worker killed by ``kill()`` while idle or mid-cell: the cell (if running)
    fails saying ``why`` with what it printed kept, the GPU is free within GPU_BACK_S,
    ``leftover()`` is empty, and the next cell gets the notebook's variables."""
    s = session_of(ip)
    if phase == "idle":
        kill()
        released(d, s, why + ";", GPU_BACK_S)
    else:
        t0: list[float] = []

        def fault(pid: int) -> None:
            kill()
            t0.append(time.monotonic())

        result, cap, errors = run_faulting(ip, RUNNING, fault)
        assert not errors, errors
        assert not result.success
        msg = str(result.error_in_exec)
        assert f"{why} while running the cell; variables defined on the worker are lost" in msg, msg
        assert BEFORE.match(cap.stdout), cap.stdout  # the line printed before the kill is kept
        released(d, s, why + " while running the cell", GPU_BACK_S - (time.monotonic() - t0[0]))
    assert holder(d) is None
    assert leftover() == []
    cap = next_cell_sees_the_notebook(ip)
    assert cap.stdout == "41\n"
    assert notes(cap)[0].startswith("the previous worker is gone (") and why in notes(cap)[0], notes(cap)


@pytest.mark.parametrize("phase", PHASES)
def test_worker_process_killed(phase, daemon_factory, make_shell):
    d = daemon_factory(H100)
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nimport os\nx = 1\nprint(os.getpid())")
    assert result.success
    pid = int(cap.stdout)
    kill = lambda: os.kill(pid, signal.SIGKILL)  # noqa: E731
    worker_killed(phase, d, ip, "its worker killed by SIGKILL", kill, lambda: worker_pids(d.connection_file))
    release_leaves_nothing(ip, d, None)


@pytest.mark.parametrize("phase", PHASES)
def test_container_killed(phase, engine, daemon_factory, make_shell):
    d = daemon_factory(*docker_args(engine, H100))
    ip = make_shell(d)
    assert ip.run_cell("%%gpu H100\nx = 1").success
    s = session_of(ip)
    (container,) = containers(engine, s)
    why = "its worker container killed by SIGKILL"
    worker_killed(phase, d, ip, why, container.kill, lambda: containers(engine, s))  # SIGKILL, as `docker kill`
    release_leaves_nothing(ip, d, engine)


# ---------------------------------------------------------------------------- the notebook's kernel


@pytest.mark.parametrize("phase", PHASES)
def test_kernel_killed(phase, daemon_factory, make_shell, tmp_path):
    d = daemon_factory(H100, *KERNEL_GONE)
    gone = "its notebook's kernel went away"
    with kernel(d.connection_file, "%config GPUMagics.keepalive_interval = 0.5") as (km, kc):
        out, status = krun(kc, "%%gpu H100\nx = 1\nprint('ready')")
        assert (out, status) == ("ready\n", "ok")
        s = krun(kc, "print(get_ipython().magics_manager.registry['GPUMagics'].session_id)")[0].strip()
        if phase == "idle":
            kill_kernel(km)
            t0 = time.monotonic()
            # The user sees only that the kernel died; the daemon gives the GPU back.
            released(d, s, gone, KERNEL_GPU_BACK_S)
        else:
            msg_id = kc.execute(RUNNING)
            seen = ""
            while not BEFORE.match(seen):  # the line the cell printed has reached the notebook
                m = kc.get_iopub_msg(timeout=WAIT_S)
                if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "stream":
                    seen += m["content"]["text"]
            kill_kernel(km)
            d.log.wait_for(rf"session {s} detached: .*\(its cell runs on\)", timeout=WAIT_S)
            assert holder(d) == s  # the running cell keeps its GPU
            (tmp_path / "bulk" / s / "go").touch()
            t0 = time.monotonic()
            released(d, s, gone, GPU_BACK_S + 1)  # orphan_grace after the cell ends
    assert time.monotonic() - t0 < KERNEL_GPU_BACK_S
    assert holder(d) is None
    assert worker_pids(d.connection_file) == []
    # The next notebook (the dead kernel's own variables died with it) gets the H100.
    ip = make_shell(d)
    assert next_cell_sees_the_notebook(ip).stdout == "41\n"
    release_leaves_nothing(ip, d, None)


# ---------------------------------------------------------------------------- the SSH tunnel


@pytest.fixture
def tunnelled(tmp_path, runtime_dir, make_shell):
    """A notebook connected through a real sshd to a daemon 'on another host'."""
    with sshd_server(tmp_path) as sshd:
        d = elsewhere_daemon(tmp_path, H100)
        try:
            ip = make_shell(d)
            # A ping after 0.5 s of silence; 5 s without its pong is a lost tunnel.
            ip.run_cell("%config GPUMagics.heartbeat_interval = 0.5\n%config GPUMagics.heartbeat_timeout = 5.0")
            result, cap = run(ip, connect_line(sshd, d))
            assert result.success, (cap.stdout, result.error_in_exec)
            yield sshd, d, ip
        finally:
            d.stop()
            stop_workers(d.connection_file)


@pytest.mark.parametrize("phase", PHASES)
def test_ssh_tunnel_killed(phase, tunnelled, tmp_path):
    sshd, d, ip = tunnelled
    assert ip.run_cell("%%gpu H100\nx = 'kept'").success
    s = session_of(ip)

    def fault(pid: int = 0) -> None:
        conns = connection_processes(sshd["proc"].pid)
        assert conns
        for p in conns:
            os.kill(p, signal.SIGKILL)

    if phase == "idle":
        tunnel = ip.magics_manager.registry["GPUMagics"]._tunnel
        fault()
        deadline = time.monotonic() + WAIT_S
        while tunnel.alive():  # until its SSH transport has seen the connection end
            assert time.monotonic() < deadline, "the tunnel never noticed its connection died"
            time.sleep(0.02)  # polling a condition, with a deadline: paramiko signals no event
        # The next cell sees the tunnel is dead and makes a new one (below).
    else:
        # The daemon's bulk directory is not this host's: the markers go elsewhere.
        marks = tmp_path / "marks"
        marks.mkdir()
        cell = RUNNING.replace("os.environ['JUPYTER_GPU_BULK_DIR']", repr(str(marks)))
        cell += f"\nopen({str(marks / 'done')!r}, 'w').close()"
        result, cap, errors = run_faulting(ip, cell, fault)
        assert not errors, errors
        assert not result.success
        msg = plain(str(result.error_in_exec))
        assert "lost contact with the jupyter-gpu daemon at tcp://127.0.0.1:" in msg, msg
        assert "The remote cell may still be running" in msg, msg
        assert BEFORE.match(cap.stdout), cap.stdout  # what arrived before the fault stays
        (marks / "go").touch()
        wait_for_file(marks / "done", WAIT_S)  # the cell ran on without its tunnel
    assert holder(d) == s  # a lost tunnel is no reason to give the GPU back
    assert len(worker_pids(d.connection_file)) == 1
    extra = ", x" + (", made" if phase == "running" else "")
    cap = next_cell_sees_the_notebook(ip, extra)  # through a new tunnel, to the same worker
    assert cap.stdout == "41 kept" + (" in the cell" if phase == "running" else "") + "\n"
    release_leaves_nothing(ip, d, None)
