"""One executor process per session on the daemon's own host: the embedded default."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from traitlets import Dict, Float, List, Unicode

from kernel_worker.backends.base import Backend, WorkerExit, WorkerSpec, describe_exit


class ProcessBackend(Backend):
    python = Unicode(sys.executable, help="Python interpreter that runs the executor.").tag(config=True)
    cwd = Unicode("", help="Working directory of worker processes (default: the daemon's).").tag(config=True)
    stop_grace = Float(2.0, help="Seconds between SIGTERM and SIGKILL when stopping a worker.").tag(config=True)
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

    async def start(self, spec: WorkerSpec) -> asyncio.subprocess.Process:
        unsupported = sorted(k for k, v in spec.options.items() if v)
        if unsupported:
            raise RuntimeError(
                f"the process backend cannot honour {', '.join('--' + k for k in unsupported)}: "
                "run the daemon with --backend docker for images and volumes"
            )
        env = {
            **{k: v for k, v in os.environ.items() if k in self.env_keep},
            **self.extra_env,
            **self.gpu_env(spec.gpus),
            **spec.executor_env(spec.socket_dir, spec.bulk_dir),
            "PYTHONUNBUFFERED": "1",
        }
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
        with open(spec.log_path, "ab") as log:
            return await asyncio.create_subprocess_exec(
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

    async def signal(self, handle: Any, signum: int) -> None:
        if handle.returncode is None:
            handle.send_signal(signum)

    async def stop(self, handle: Any) -> None:
        if handle.returncode is not None:
            return
        handle.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(handle.wait(), self.stop_grace)
        except asyncio.TimeoutError:
            handle.kill()
            await handle.wait()

    async def wait(self, handle: Any) -> WorkerExit:
        code = await handle.wait()
        return WorkerExit(code, describe_exit(code))
