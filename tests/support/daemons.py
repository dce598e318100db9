"""A real daemon subprocess (``python -m kernel_worker``) and the options for its docker backend."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_gpu.client import DaemonClient
from kernel_worker import protocol as P

from .logs import LogWatcher
from .procs import START_TIMEOUT, stop_process


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

    def kill(self) -> None:
        """SIGKILL, as a crash would (nothing cleans up), and wait until it is gone."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        stop_process(self.proc, 10)


def start_daemon(tmp: Path, *args: str, prefix: tuple[str, ...] = ()) -> Daemon:
    """``python -m kernel_worker`` with ``args``, run through ``prefix`` (a command that
    ends by exec'ing its arguments, so the daemon keeps its pid) when one is given."""
    cf = tmp / "daemon.json"
    proc = subprocess.Popen(
        [
            *prefix,
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


def docker_args(engine, *extra: str, notebook_libs: bool = True) -> list[str]:
    """A docker backend on the test engine. ``notebook_libs`` mounts this venv's packages
    (numpy, IPython, pandas... at the notebook's exact versions) read-only into workers,
    the way an operator shares a package directory with ``DockerBackend.extra_mounts``."""
    from . import dockerd

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


def printed(client: DaemonClient, session: str, code: str, **content) -> str:
    """Run ``code`` in ``session`` through a bare client (``gpu`` cpu unless given); what it
    printed. Fails the test if the cell failed."""
    seen: list[P.Message] = []
    msg = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": code, **content}, session)
    done = client.request(msg, seen.append, timeout=60)
    assert done.content["ok"], seen
    return "".join(m.content["text"] for m in seen if m.type == P.Msg.STREAM)
