"""The snapshot store's files on the daemon's host (snapshots.py decides what goes where):
copies between the store and a worker's bulk directory, which a container can write, and
small JSON records. Blocking: callers run these in a thread."""

from __future__ import annotations

import json
import os
import shutil
import stat

from kernel_worker.daemon import paths
from kernel_worker.workspace_tree import human

COPY_CHUNK = 16 * 1024**2


class SnapshotRefused(Exception):
    pass


def copy_files(src: str, dst: str, owner: tuple[int, int] | None, most: int) -> None:
    """A snapshot's files from ``src`` into ``dst`` (0600; ``owner``'s, for a container
    running as another uid). Either side may be a directory a container can write: plain
    files only, opened without blocking (a FIFO is skipped, never waited on), never through
    a symlink, new files only, and at most ``most`` bytes in all (the user's quota)."""
    total = 0
    for name in os.listdir(src):
        try:
            fd = os.open(os.path.join(src, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a symlink, or gone: not a snapshot file
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            total += st.st_size
            if total > most:
                raise SnapshotRefused(f"the snapshot is larger than your snapshot quota ({human(most)})")
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NONBLOCK
            with os.fdopen(paths.open_private(os.path.join(dst, name), flags), "wb") as g:
                shutil.copyfileobj(f, g, COPY_CHUNK)
                if owner is not None:
                    os.fchown(g.fileno(), *owner)


def read_json(path: str) -> dict | None:
    try:
        with os.fdopen(paths.open_private(path, os.O_RDONLY)) as f:
            out = json.load(f)
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def write_json(path: str, content: dict) -> None:
    with os.fdopen(paths.open_private(path + ".tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC), "w") as f:
        json.dump(content, f)
    os.replace(path + ".tmp", path)


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def size_of(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total
