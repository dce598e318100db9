"""One executor process per session on the daemon's own host: the embedded default.

Workers run in their own process group and outlive a daemon that dies (killed, or
restarted for an upgrade): each start is written down (pid, the kernel's start time of
that pid, GPUs, user) in the daemon's private state directory, so a restarted daemon
finds its workers again, as the docker backend finds its containers by label, and can
tell a pid that was reused by another process from its own worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from traitlets import Dict, Float, List, Unicode

from kernel_worker.backends.base import Backend, WorkerExit, WorkerSpec, describe_exit
from kernel_worker.daemon import paths
from kernel_worker.daemon.errors import UnsafePath

STARTS_DIR = "process-workers"


def _started_at(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone or a
    zombie: with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


class ProcessHandle:
    """A worker process: one this daemon started (``proc``), or one it found after a
    restart, which is not its child (its exit code cannot be known, only its end)."""

    def __init__(self, wid: str, pid: int, started: int | None, proc: Any = None, record: dict | None = None):
        self.wid, self.pid, self.started, self.proc = wid, pid, started, proc
        self.record = record or {}

    @property
    def returncode(self) -> int | None:
        if self.proc is not None:
            return self.proc.returncode
        return None if self.started is not None and _started_at(self.pid) == self.started else -1

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    async def wait(self) -> int | None:
        if self.proc is not None:
            return await self.proc.wait()
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None
        try:
            if self.returncode is None:
                ended = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().add_reader(fd, lambda: ended.done() or ended.set_result(None))
                try:
                    await ended
                finally:
                    asyncio.get_running_loop().remove_reader(fd)
        finally:
            os.close(fd)
        return None


class ProcessBackend(Backend):
    name = "process"
    python = Unicode(sys.executable, help="Python interpreter that runs the executor.").tag(config=True)
    cwd = Unicode("", help="Working directory of worker processes (default: the daemon's).").tag(config=True)
    stop_grace = Float(2.0, help="Seconds between SIGTERM and SIGKILL when stopping a worker.").tag(config=True)
    orphan_timeout = Float(
        600.0,
        help="Seconds a worker whose daemon went away waits for a restarted daemon to adopt it, then exits. "
        "A running cell always finishes first.",
    ).tag(config=True)
    env_keep = List(
        Unicode(),
        [
            "PATH",
            "HOME",
            "USER",
            "LOGNAME",
            "SHELL",
            "LANG",
            "LANGUAGE",
            "LC_ALL",
            "LC_CTYPE",
            "TZ",
            "TERM",
            "TMPDIR",
            "LD_LIBRARY_PATH",
            "CUDA_HOME",
        ],
        help="The daemon's environment variables a worker inherits; no other one reaches it (the daemon's "
        "may hold secrets). Add names here, or set values with extra_env.",
    ).tag(config=True)
    extra_env = Dict(value_trait=Unicode(), help="Environment for every worker, on top of env_keep.").tag(config=True)

    @property
    def starts_dir(self) -> str:
        return paths.private_dir(os.path.join(self.state_dir, STARTS_DIR))

    async def start(self, spec: WorkerSpec) -> ProcessHandle:
        self.refuse_options(spec, "run the daemon with --backend docker for images and volumes")
        env = {
            **{k: v for k, v in os.environ.items() if k in self.env_keep},
            **self.extra_env,
            **self.gpu_env(spec.gpus),
            **spec.executor_env(spec.socket_dir, spec.bulk_dir),
            "PYTHONUNBUFFERED": "1",
        }
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        packages = self.packages_for(spec.user) if self.packages_for is not None else ""  # `%gpu pip install`
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, packages, env.get("PYTHONPATH", "")]))
        with open(spec.log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "kernel_worker.worker",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.cwd or None,
                start_new_session=True,  # a Ctrl-C aimed at the daemon must not hit cells
            )
        record = {"pid": proc.pid, "started": _started_at(proc.pid), "gpus": [g.uuid for g in spec.gpus]}
        record["user"] = spec.user
        handle = ProcessHandle(spec.session, proc.pid, record["started"], proc, record)
        path = paths.child(self.starts_dir, spec.session + ".json")
        with os.fdopen(paths.open_private(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC), "w") as f:
            json.dump(record, f)
        return handle

    async def signal(self, handle: ProcessHandle, signum: int) -> None:
        handle.send_signal(signum)

    async def stop(self, handle: ProcessHandle) -> None:
        if handle.returncode is None:
            handle.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(handle.wait(), self.stop_grace)
            except asyncio.TimeoutError:
                handle.send_signal(signal.SIGKILL)
                await handle.wait()
        self._forget(handle.wid)

    def _forget(self, wid: str) -> None:
        try:
            os.unlink(paths.child(self.starts_dir, wid + ".json"))
        except (FileNotFoundError, UnsafePath):
            pass

    async def wait(self, handle: ProcessHandle) -> WorkerExit:
        code = await handle.wait()
        if code is None:
            return WorkerExit(None, "ended while this daemon was not its parent (exit code unknown)")
        return WorkerExit(code, describe_exit(code))

    # ------------------------------------------------------------------ restart

    async def find(self) -> list[tuple[str, ProcessHandle]]:
        """Workers started by an earlier run of this daemon that are still running."""
        found = []
        for name in sorted(os.listdir(self.starts_dir)):
            wid = name.removesuffix(".json")
            try:
                with os.fdopen(paths.open_private(paths.child(self.starts_dir, name), os.O_RDONLY)) as f:
                    record = json.load(f)
                pid, started = int(record["pid"]), record["started"]
            except (OSError, ValueError, KeyError, TypeError, UnsafePath):
                record, pid, started = None, 0, None
            if record is None or pid <= 0 or started is None or _started_at(pid) != started:
                self._forget(wid)  # gone (or its pid is another process now)
                continue
            found.append((wid, ProcessHandle(wid, pid, started, None, record)))
        return found

    def is_running(self, handle: ProcessHandle) -> bool:
        return handle.returncode is None

    def started_with(self, handle: ProcessHandle) -> dict:
        """From what this daemon wrote at the start, in its private directory."""
        return {"gpus": list(handle.record.get("gpus") or []), "user": str(handle.record.get("user", ""))}
