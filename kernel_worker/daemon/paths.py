"""Where a daemon keeps things, and the checks that keep them its own.

The socket and connection file clients find live in the Jupyter runtime directory; the
daemon's private state (signing key, session records, logs, ledger) in ``state_dir``;
large buffers that same-host clients and workers exchange in ``bulk_root``. Default
names are predictable, so another local user may have made them first: a directory is
used only if ``lstat`` shows it is ours, mode 0700 and no symlink, and every path built
from a client's value is checked to be one plain name inside its root, symlinks
resolved, before anything is created, opened, mounted or removed there.

Light on purpose: the notebook side imports the defaults from here without the daemon.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile

from jupyter_core.paths import jupyter_runtime_dir

from kernel_worker import protocol as P
from kernel_worker.daemon.errors import UnsafePath

KEY_FILE = "daemon.key"
PRIVATE = 0o700
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # one plain path component


def default_url() -> str:
    return "ipc://" + os.path.join(jupyter_runtime_dir(), "jupyter-gpu-daemon.sock")


def default_connection_file() -> str:
    return os.path.join(jupyter_runtime_dir(), "jupyter-gpu-daemon.json")


def _private_base() -> str:
    """$XDG_RUNTIME_DIR when it is ours and private (per-user, 0700, on tmpfs), else the
    temporary directory. Short either way: ipc socket paths are limited to about 100
    characters."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and len(xdg) < 40:
        try:
            check_private_dir(xdg)
            return xdg
        except UnsafePath:
            pass
    return tempfile.gettempdir()


def default_state_dir(connection_file: str) -> str:
    """Stable across restarts (so a restarted daemon finds its workers)."""
    tag = hashlib.sha1(os.path.abspath(connection_file).encode()).hexdigest()[:10]
    return os.path.join(_private_base(), f"jupyter-gpu-{os.getuid()}-{tag}")


def default_bulk_root() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else _private_base()
    return os.path.join(base, f"jupyter-gpu-{os.getuid()}")


def check_private_dir(path: str) -> None:
    """Refuse a directory that another user could have made, swapped or can read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafePath(f"{path} does not exist") from None
    fix = f"remove it (`rm -rf {path}`, as its owner) or choose another directory in the daemon's configuration"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"refusing to use {path}: it is a symbolic link; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"refusing to use {path}: it is not a directory; {fix}")
    if st.st_uid != os.getuid():
        raise UnsafePath(f"refusing to use {path}: it belongs to uid {st.st_uid}, not to this daemon's uid; {fix}")
    if st.st_mode & 0o077:
        raise UnsafePath(
            f"refusing to use {path}: its mode is {stat.S_IMODE(st.st_mode):o}, readable by others; "
            f"`chmod 700 {path}` if it is yours"
        )


def private_dir(path: str) -> str:
    """Create ``path`` 0700 (its parents as needed) or accept an existing one only if it
    passes ``check_private_dir``."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, PRIVATE)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def child(root: str, name: str) -> str:
    """``root/name`` for a ``name`` that came from outside (a session id, a file name):
    one plain component, and still inside ``root`` once symlinks are resolved."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UnsafePath(f"{str(name)[:40]!r} is not a plain name")
    path = os.path.join(root, name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(root):
        raise UnsafePath(f"{path} leads outside {root}")
    return path


def open_private(path: str, flags: int) -> int:
    """A file descriptor for a file of ours: never through a symlink, created 0600."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def load_or_make_key(state_dir: str) -> bytes:
    """The signing key, kept in the state directory so a restarted daemon keeps its
    clients (and they keep their sessions)."""
    private_dir(state_dir)
    path = os.path.join(state_dir, KEY_FILE)
    try:
        with os.fdopen(open_private(path, os.O_RDONLY), "rb") as f:
            key = f.read().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    key = P.new_key()
    with os.fdopen(open_private(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(key)
    return key
