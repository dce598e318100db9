"""Finding the daemon: an explicit connection file, or the embedded local one.

With nothing configured, the first notebook starts a local daemon (process backend)
in the background; every later kernel finds it again through its connection file
in the Jupyter runtime directory. It exits by itself after a quiet period.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import time

from kernel_worker.daemon import default_connection_file

from jupyter_gpu.client import DaemonClient, DaemonError

ENV_CONNECTION_FILE = "JUPYTER_GPU_CONNECTION_FILE"


def read_connection_file(path: str) -> tuple[str, bytes]:
    with open(path) as f:
        info = json.load(f)
    return info["url"], info["key"].encode()


def _alive(path: str, timeout: float) -> tuple[str, bytes] | None:
    """(url, key) of a daemon that answers a ping, else None."""
    try:
        url, key = read_connection_file(path)
    except (OSError, ValueError, KeyError):
        return None
    client = DaemonClient(url, key)
    try:
        client.call("ping", timeout=timeout)
        return url, key
    except DaemonError:
        return None
    finally:
        client.close()


def start_embedded(
    connection_file: str | None = None,
    exit_when_idle: float = 1800.0,
    start_timeout: float = 30.0,
    extra_args: list[str] | None = None,
) -> tuple[str, bytes]:
    """Find the local daemon or start one, shared by every kernel of this user.

    A lock file serialises kernels starting at the same moment, so exactly one daemon runs.
    """
    path = connection_file or default_connection_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _alive(path, timeout=2.0)
        if found:
            return found
        log_path = path.removesuffix(".json") + ".log"
        log = open(log_path, "ab")
        args = [
            sys.executable,
            "-m",
            "kernel_worker",
            f"--WorkerDaemon.connection_file={path}",
            f"--WorkerDaemon.exit_when_idle={exit_when_idle}",
            "--print-ready",
            *(extra_args or []),
        ]
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + start_timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                proc.kill()
                raise DaemonError(
                    "worker_start_failed",
                    f"the local jupyter-gpu daemon did not start in {start_timeout:g} s; see {log_path}",
                )
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise DaemonError(
                    "worker_start_failed",
                    f"the local jupyter-gpu daemon exited at start (code {proc.wait()}); see {log_path}",
                )
            line += chunk
        proc.stdout.close()
        return read_connection_file(path)


def resolve(connection_file: str = "", **embedded: object) -> tuple[str, bytes]:
    """(url, key) of the daemon to use: configured, from the environment, or embedded."""
    path = connection_file or os.environ.get(ENV_CONNECTION_FILE, "")
    if path:
        try:
            return read_connection_file(path)
        except (OSError, ValueError, KeyError) as e:
            raise DaemonError("no_session", f"cannot read the daemon connection file {path}: {e}") from None
    return start_embedded(**embedded)  # type: ignore[arg-type]
