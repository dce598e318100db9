"""Fixtures that start the real parts: a daemon subprocess, a real InteractiveShell with
the extension loaded, and real kernels through nbclient. Everything started here is
stopped again by its process id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.daemons import Daemon, docker_args, start_daemon
from support.logs import LogWatcher
from support.orphans import forget_daemon
from support.sshd_server import elsewhere_daemon as elsewhere
from support.sshd_server import sshd_server
from support.workdir_story import CSV

# A real Jupyter Server for the extension's tests; `slurm` and `gateway` for the Slurm backend's.
pytest_plugins = ["pytest_jupyter.jupyter_server", "support.slurm_gateway"]
# tests/gpu need torch (gigabytes of wheels) and, some, a GPU: `make test-gpu` runs them there.
collect_ignore = [] if os.environ.get("JUPYTER_GPU_TORCH_TESTS") else ["gpu"]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "daemon_args(*options): extra options for the elsewhere_daemon fixture")


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
    for cf in {d.connection_file for d in started}:
        forget_daemon(cf)  # workers of a daemon a test killed and did not start again; its state


@pytest.fixture
def sshd(tmp_path):
    """A real sshd on a free loopback port (its own host key, one authorised test key)."""
    with sshd_server(tmp_path) as s:
        yield s


@pytest.fixture
def elsewhere_daemon(tmp_path, runtime_dir, request):
    """A daemon on loopback tcp as on another host: its bulk root is a tmpfs in a mount
    namespace of its own, so the notebook cannot take the same-host shortcut. A test may
    add daemon options with ``@pytest.mark.daemon_args(...)`` ("{tmp}" is its tmp_path)."""
    marker = request.node.get_closest_marker("daemon_args")
    d = elsewhere(tmp_path, *(a.format(tmp=tmp_path) for a in (marker.args if marker else ())))
    yield d
    d.stop()
    forget_daemon(d.connection_file)


@pytest.fixture(scope="session")
def engine():
    """One real Docker engine for the whole run, stopped by its pid at the end."""
    from support import dockerd

    eng = dockerd.start_engine(LogWatcher)
    try:
        dockerd.ensure_images(eng.client, eng.url)
        yield eng
    finally:
        eng.stop()


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


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch) -> Path:
    """A notebook's directory, the kernel's cwd: data to read, an ignored secret, a big file."""
    nb = tmp_path / "nb"
    (nb / "data").mkdir(parents=True)
    (nb / "data" / "x.csv").write_text(CSV)
    (nb / "helper.py").write_text("ANSWER = 42\n")
    (nb / ".jupyter-gpu-ignore").write_text("secret.txt\n")
    (nb / "secret.txt").write_text("do not send")
    (nb / "big.bin").write_bytes(b"\0" * 5000)
    monkeypatch.chdir(nb)
    return nb
