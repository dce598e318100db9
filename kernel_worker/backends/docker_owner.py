"""Who owns what a worker container mounts from the daemon's host.

A container runs as ``DockerBackend.user``. Where that is not the daemon's own uid (a root
daemon running cells as, say, 65534:65534), the user's directories the container mounts
(its workspace, its ``%gpu pip install`` directory) must be that uid's, or the cells
cannot even enter them: they are 0700, and a container has no capability to pass that.
So the daemon hands each such directory (the mount's root, still 0700) and what it writes
inside to the worker's uid. Nothing becomes readable by anyone else: every directory that
holds one stays the daemon's own, 0700, so no other user of the host reaches it, and the
container sees only the directory it mounts.

Light (the standard library and ``paths``): the workspace and package code import it.
"""

from __future__ import annotations

import os
import stat

from kernel_worker.daemon import paths
from kernel_worker.daemon.errors import UnsafePath

Owner = tuple[int, int]  # uid, gid


def worker_owner(backend: object) -> Owner | None:
    """The uid:gid that must own what ``backend``'s workers mount, where a root daemon runs
    them as a given uid (docker's ``user``); None where workers run as the daemon's own uid
    (or the daemon is not root, which then is the same)."""
    owner = getattr(backend, "worker_owner", None)
    return owner() if callable(owner) and os.getuid() == 0 else None


def handed_dir(path: str, owner: Owner | None) -> str:
    """``path`` as ``paths.private_dir`` makes and checks it, then owned by ``owner``: 0700,
    never a symlink. Only a root daemon hands directories over, and only inside its own
    0700 directories, so whoever owns one there now got it from this daemon (under an earlier
    ``DockerBackend.user``): it is handed on, never refused for its owner."""
    if owner is None:
        return paths.private_dir(path)
    parent = os.path.dirname(path)
    paths.check_private_dir(parent)
    try:
        os.mkdir(path, paths.PRIVATE)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"refusing to use {path}: it is not a directory (a symbolic link?); remove it")
    if st.st_mode & 0o077:
        raise UnsafePath(
            f"refusing to use {path}: its mode is {stat.S_IMODE(st.st_mode):o}, readable by others; "
            f"`chmod 700 {path}` if it is yours"
        )
    if (st.st_uid, st.st_gid) != owner:
        os.chown(path, *owner, follow_symlinks=False)
    return path
