"""Landing a sync's files in the workspace: written from the bytes the notebook sent, or
copied in the kernel from the notebook's directory on the same host (``workspace_copy``),
in threads when they are large (``os.write`` and ``copy_file_range`` release the GIL),
each recorded in the sync's state as it lands, so a failure part-way leaves a state that
says exactly what is there."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

from kernel_worker.workspace_tree import BadPath, Tree, WorkspaceError

PARALLEL_BYTES = 8 * 1024**2  # below this a sync's files are written one after another
BATCH = 16  # files one thread writes in a row: few futures, not one a file


def land(tree: Tree, src: Tree | None, st: dict, manifest: Mapping, jobs: list, chmods: list, done: dict) -> None:
    """Write or copy (from ``src``) the files of ``jobs`` ((relpath, contents or None,
    mode, stat to copy)), in threads when large (os.write and copy_file_range release
    the GIL), and fix the modes in ``chmods``, recording each in ``st`` as it lands;
    then raise the first error. A copy whose source changed is left out of ``st``."""
    for rel, data, *_ in jobs:  # directories first, one thread: the threads only read the Trees' caches
        reldir = rel.rpartition("/")[0]
        tree.dir(reldir, create=True)
        if data is None and src is not None:
            try:
                src.dir(reldir)  # O_NOFOLLOW, a directory at a time, as the workspace's own
            except (OSError, BadPath):
                pass  # (a link, or gone): the file is sent instead

    def one(job: tuple) -> tuple:
        rel, data, mode, want = job
        try:
            if data is not None:
                return rel, tree.write(rel, data, mode)
            if src is None or rel.rpartition("/")[0] not in src._fds:
                return rel, None
            try:
                fd = src._open(rel)
            except (OSError, BadPath):
                return rel, None
            try:
                return rel, tree.copy(rel, fd, want, mode)
            finally:
                os.close(fd)
        except (OSError, WorkspaceError) as e:
            return rel, e

    if len(jobs) > 1 and sum(manifest[j[0]][0] for j in jobs) > PARALLEL_BYTES:
        batches = [jobs[i : i + BATCH] for i in range(0, len(jobs), BATCH)]
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            results = [r for batch in pool.map(lambda b: [one(j) for j in b], batches) for r in batch]
    else:
        results = [one(j) for j in jobs]
    written = len(results)
    results += [(rel, tree.chmod(rel, manifest[rel][2])) for rel in chmods]  # only the executable bit changed
    error = None
    for i, (rel, s) in enumerate(results):
        if s is None:  # not copied: the source changed since the notebook hashed it
            done["need"].append(rel)
            continue
        if isinstance(s, BaseException):
            error = error or s
            continue
        size, sha, mode = manifest[rel]
        st[rel] = [size, sha, mode, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]
        if i < written:
            done["written"].append(rel)
    if error is not None:
        raise error
