"""Fixtures that start the real parts: a daemon subprocess, a real InteractiveShell with
the extension loaded, and real kernels through nbclient. Everything started here is
stopped again by its process id."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from procs import stop_process

from jupyter_gpu.client import DaemonClient

pytest_plugins = ["pytest_jupyter.jupyter_server"]  # a real Jupyter Server for the extension's tests

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


class LogWatcher:
    """Collects a process's stderr lines; ``wait_for`` blocks until a line matches."""

    def __init__(self, stream, path: Path):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._path = path
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        with open(self._path, "a") as out:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace")
                out.write(line)
                out.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0, nth: int = 1) -> re.Match:
        """The ``nth`` line matching ``pattern``, waiting for it up to ``timeout`` seconds."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i, seen = 0, 0
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        seen += 1
                        if seen == nth:
                            return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout} s:\n{''.join(self.lines[-30:])}"
                    )
                self._cond.wait(left)


def wait_listening(port: int, timeout: float = START_TIMEOUT) -> None:
    """Until something accepts connections on loopback ``port`` (servers log their URL
    a moment before they listen)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            select.select([], [], [], 0.02)  # a retry interval, not a synchronisation


@dataclass
class Daemon:
    proc: subprocess.Popen
    connection_file: str
    url: str
    key: bytes
    log: LogWatcher
    clients: list = field(default_factory=list)

    def client(self, **kw) -> DaemonClient:
        c = DaemonClient(self.url, self.key, **kw)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        stop_process(self.proc, 10)


def start_daemon(tmp: Path, *args: str) -> Daemon:
    cf = tmp / "daemon.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kernel_worker",
            "--print-ready",
            f"--WorkerDaemon.connection_file={cf}",
            *([] if any(a.startswith("--url=") for a in args) else [f"--WorkerDaemon.url=ipc://{tmp}/daemon.sock"]),
            f"--WorkerDaemon.bulk_root={tmp}/bulk",
            "--log-level=INFO",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp,
    )
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    log = LogWatcher(proc.stderr, tmp / "daemon.log")
    if not line:
        proc.kill()
        raise AssertionError(f"daemon did not start: {proc.wait()} {''.join(log.lines)}")
    info = json.loads(line)
    conn = json.loads(cf.read_text())
    return Daemon(proc, str(cf), info["url"], conn["key"].encode(), log)


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch) -> Path:
    """A private Jupyter runtime dir, so tests never meet the user's own daemon."""
    rt = tmp_path / "runtime"
    rt.mkdir(exist_ok=True)  # pytest-jupyter may have made the same one
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(rt))
    return rt


@pytest.fixture
def daemon_factory(tmp_path, runtime_dir):
    started: list[Daemon] = []

    def make(*args: str) -> Daemon:
        d = start_daemon(tmp_path, *args)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="session")
def engine():
    """One real Docker engine for the whole run, stopped by its pid at the end."""
    import dockerd

    eng = dockerd.start_engine(LogWatcher)
    try:
        dockerd.ensure_images(eng.client, eng.url)
        yield eng
    finally:
        eng.stop()


def docker_args(engine, *extra: str, notebook_libs: bool = True) -> list[str]:
    """A docker backend on the test engine. ``notebook_libs`` mounts this venv's packages
    (numpy, IPython, pandas... at the notebook's exact versions) read-only into workers,
    the way an operator shares a package directory with ``DockerBackend.extra_mounts``."""
    import dockerd

    args = [
        "--backend=docker",
        f"--DockerBackend.docker_url={engine.url}",
        f"--DockerBackend.image={dockerd.IMAGE}",
        "--DockerBackend.network_mode=none",
    ]
    if notebook_libs:
        import sysconfig

        site = sysconfig.get_paths()["purelib"]
        args += [
            f"--DockerBackend.extra_mounts={site}:/opt/notebook-site:ro",
            "--DockerBackend.extra_env=PYTHONPATH=/opt/notebook-site",
        ]
    return args + list(extra)


@pytest.fixture(params=["process", "docker"])
def backend_args(request) -> list[str]:
    """Daemon options for each backend the notebook-level suite runs against."""
    if request.param == "process":
        return []
    return docker_args(request.getfixturevalue("engine"))


@pytest.fixture
def daemon(daemon_factory, backend_args) -> Daemon:
    """A daemon with a simulated host of one H100 and two A100-80GB, on each backend."""
    return daemon_factory(
        "--simulate-gpus=H100:1,A100-80GB:2", "--WorkerDaemon.worker_heartbeat_interval=0.5", *backend_args
    )


@pytest.fixture
def make_shell(monkeypatch):
    """Fresh real IPython InteractiveShells with the extension loaded, pointed at a daemon."""
    from IPython.core.interactiveshell import InteractiveShell

    made = []

    def make(d: Daemon):
        monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", d.connection_file)
        InteractiveShell.clear_instance()
        ip = InteractiveShell.instance()
        ip.run_cell("%load_ext jupyter_gpu", store_history=False)
        made.append(ip)
        return ip

    yield make
    for ip in made:
        magics = ip.magics_manager.registry["GPUMagics"]
        magics._at_exit()
        magics._drop_client()
    InteractiveShell.clear_instance()


@pytest.fixture
def shell(daemon, make_shell):
    """A real InteractiveShell with the extension loaded, pointed at ``daemon``."""
    return make_shell(daemon)


def run(ip, cell: str):
    """Run a cell and capture what it showed (stdout, stderr, rich outputs)."""
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        result = ip.run_cell(cell, store_history=True)
    return result, cap


def plain(text: str) -> str:
    """``text`` without ANSI colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
