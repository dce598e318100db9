"""`%gpu pip install`: packages for one user's workers, installed on the daemon's host
into a per-user, per-Python directory that every later worker of that user has on its
path (a docker worker gets it mounted read-only; a worker on a node that cannot see this
host's files, a Slurm node without a shared filesystem, keeps a copy of it that is brought
up to date over its socket before each cell and never written back: daemon/mirror.py),
surviving release and restarts. A worker started before an install sees the new packages
in its next cell. pip runs here, where the network is, so containers and nodes need none;
its output streams back to the notebook as it comes.

What the client sends is a list of requirement specifiers, checked one by one: never an
option that could point pip at another index, a file or a command."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from typing import TYPE_CHECKING

from kernel_worker import protocol as P
from kernel_worker.backends.docker_owner import handed_dir, worker_owner
from kernel_worker.daemon import paths
from kernel_worker.workspace import Workspaces

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

_VERSION = r"(?:==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!_-]+"
SPEC_RE = re.compile(
    rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,99}}(?:\[[A-Za-z0-9._,-]{{1,100}}\])?(?:{_VERSION}(?:,{_VERSION})*)?"
)
FLAGS = frozenset({"--pre", "--no-deps"})  # the options a notebook may pass on
MOST_SPECS = 64
PYTHON_RE = re.compile(r"3\.\d{1,2}")


class Packages:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log

    def dir_for(self, user: str, python: str = "") -> str:
        """``user``'s package directory for a Python ``X.Y`` (the daemon's by default): 0700,
        owned by the uid workers run as (a container mounts it; see ``docker_owner``)."""
        python = python if PYTHON_RE.fullmatch(python or "") else f"{sys.version_info[0]}.{sys.version_info[1]}"
        root = paths.private_dir(os.path.join(self.d.state_dir, "packages"))
        mine = paths.private_dir(paths.child(root, Workspaces.user_part(user)))
        return handed_dir(paths.child(mine, f"py{python}"), worker_owner(self.d.backend_instance))

    async def install(self, ident: bytes, msg: P.Message, user: str) -> None:
        args = msg.content.get("args")
        python = str(msg.content.get("python") or "")[:8]
        python = ".".join(python.split(".")[:2])
        bad = _refused(args)
        if bad:
            self.d.front.fail(ident, msg, P.Err.PIP, bad)
            return
        target = self.dir_for(user, python)
        cmd = [sys.executable, "-m", "pip", "install", "--target", target, "--upgrade", "--no-input"]
        cmd += ["--disable-pip-version-check", "--progress-bar", "off"]
        if python and python != f"{sys.version_info[0]}.{sys.version_info[1]}":  # wheels for the worker's Python
            cmd += ["--python-version", python, "--only-binary=:all:"]
        self.log.info("pip install for %s into %s: %s", user, target, " ".join(args))
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            umask=0o022,  # readable by the uid workers run as; the 0700 directory keeps everyone else out
        )
        try:
            await asyncio.wait_for(self._relay(proc, ident, msg), self.d.pip_timeout)
            code = await proc.wait()
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            self.d.front.fail(
                ident, msg, P.Err.PIP, f"pip did not finish within pip_timeout ({self.d.pip_timeout:g} s)"
            )
            return
        finally:
            if proc.returncode is None:
                proc.kill()
        if code:
            self.d.front.fail(ident, msg, P.Err.PIP, f"pip install failed (exit status {code}): see its output above")
        else:
            self.d.front.reply(ident, msg, {"dir": target, "python": python})

    async def _relay(self, proc: asyncio.subprocess.Process, ident: bytes, msg: P.Message) -> None:
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace")
            self.d.front.send(ident, msg.reply(P.Msg.STREAM, {"name": "stdout", "text": text}))


def _refused(args: object) -> str:
    """Why ``args`` may not go to pip ("" if they may): only requirement specifiers and a few
    harmless options, never an index, a file, a URL or a path."""
    if not isinstance(args, list) or not args or len(args) > MOST_SPECS:
        return f"usage: %gpu pip install SPEC... (1 to {MOST_SPECS} requirement specifiers, e.g. pandas==2.2.3)"
    specs = 0
    for a in args:
        if not isinstance(a, str):
            return "a requirement must be a string"
        if a in FLAGS:
            continue
        if not SPEC_RE.fullmatch(a):
            return (
                f"{a[:60]!r} is not a requirement this daemon installs: name[extras][==version], "
                f"or one of {', '.join(sorted(FLAGS))} (no indexes, files, URLs or paths)"
            )
        specs += 1
    return "" if specs else "name at least one package"
