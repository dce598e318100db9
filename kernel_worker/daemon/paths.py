"""Where a daemon keeps things: the socket and connection file clients find (the Jupyter
runtime directory), its private state (signing key, session records, logs, ledger) and
the directory where same-host clients and workers exchange large buffers.

Light on purpose: the notebook side imports the defaults from here without the daemon.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from jupyter_core.paths import jupyter_runtime_dir

from kernel_worker import protocol as P

KEY_FILE = "daemon.key"


def default_url() -> str:
    return "ipc://" + os.path.join(jupyter_runtime_dir(), "jupyter-gpu-daemon.sock")


def default_connection_file() -> str:
    return os.path.join(jupyter_runtime_dir(), "jupyter-gpu-daemon.json")


def default_state_dir(connection_file: str) -> str:
    """Stable across restarts (so a restarted daemon finds its workers) and short (ipc
    socket paths are limited to about 100 characters)."""
    tag = hashlib.sha1(os.path.abspath(connection_file).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"jupyter-gpu-{os.getuid()}-{tag}")


def default_bulk_root() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"jupyter-gpu-{os.getuid()}")


def load_or_make_key(state_dir: str) -> bytes:
    """The signing key, kept in the state directory so a restarted daemon keeps its
    clients (and they keep their sessions)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, KEY_FILE)
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    key = P.new_key()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key
