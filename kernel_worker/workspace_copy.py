"""Copying a sync's files on the notebook's own host: from the notebook's directory into
its workspace, in the kernel, instead of receiving them over the socket.

The notebook names its directory (absolute path, ``st_dev``, ``st_ino``) and, for each
file to copy, the stat it had when the notebook hashed it. The directory must be the very
one the notebook scanned (the same device and inode: the same host and the same view of
it), and each file is copied only while its stat is that one (``Tree.copy``); anything
else is sent over the socket instead. Only the daemon may decide that the asker may read
that directory (``Workdirs._copies``): nothing here trusts the notebook's word.
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple

from kernel_worker.workspace_tree import Stat, Tree


class Local(NamedTuple):
    """A same-host sync's source: the notebook's directory (an absolute path, and its
    ``st_dev`` and ``st_ino`` as the notebook saw them) and, for each file to copy from
    it, the stat (size, mtime_ns, ctime_ns, ino) it had when the notebook hashed it."""

    root: str
    dev: int
    ino: int
    stats: Mapping[str, Stat]


def open_source(local: Local) -> Tree | None:
    """The notebook's directory as a Tree to copy from, if it is the very directory the
    notebook scanned (same device and inode: same host, same view of it), else None."""
    if not local.root.startswith("/") or "\x00" in local.root:
        return None
    try:
        tree = Tree(local.root, private=False)
    except OSError:
        return None
    st = os.fstat(tree._fds[""])
    if (st.st_dev, st.st_ino) != (local.dev, local.ino):
        tree.__exit__()
        return None
    return tree
