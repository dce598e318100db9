"""Real ipykernel kernels (jupyter_client), as a second notebook or one that dies."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

KERNEL_TIMEOUT = 120


@contextmanager
def kernel(connection_file: str, *setup: str, env: dict | None = None):
    """A real kernel whose magic talks to the daemon of ``connection_file``."""
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "JUPYTER_GPU_CONNECTION_FILE": connection_file, **(env or {})}
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        for code in ("%load_ext jupyter_gpu", *setup):
            assert run(kc, code)[1] == "ok", code
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def run(kc, code: str) -> tuple[str, str]:
    """Execute ``code``; (its stdout, its status)."""
    out: list[str] = []

    def hook(m: dict) -> None:
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout":
            out.append(m["content"]["text"])

    reply = kc.execute_interactive(code, timeout=KERNEL_TIMEOUT, output_hook=hook)
    return "".join(out), reply["content"]["status"]


def kill(km) -> None:
    """SIGKILL the kernel, as a crash or an OOM kill would, and wait until it is gone."""
    proc = km.provisioner.process
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
