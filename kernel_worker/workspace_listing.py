"""A tree's listing with content tokens, and the files a peer lacks, in bounded batches:
what the daemon sends a worker that keeps its own copy of a tree over its socket (a Slurm
node without a shared filesystem; ``kernel_worker/daemon/mirror.py``): the notebook's
workspace, and the user's ``%gpu pip install`` packages.

A token is the xxh3-128 of a file's contents, kept per file until its stat (size, mtime,
ctime, inode) changes, so an unchanged tree costs one ``lstat`` per file and no reading.
The listing's digest (xxh3-128 of its canonical JSON, which is also how it travels) lets a
peer whose copy is exactly a listing it had say so in 32 characters, rather than sending
its whole listing back: an unchanged tree of thousands of files costs one comparison.
``__pycache__`` and ``.ipynb_checkpoints`` are never listed: Python and Jupyter write them
by themselves on either side.
"""

from __future__ import annotations

import json
from typing import Mapping, NamedTuple

import xxhash

from kernel_worker.workspace_tree import NOISE, BadPath, Stat, Tree, WorkspaceError, _key, _perm, _walk

FILES_PER_ANSWER = 1000  # files in one message, well under a message's most frames (Limits.max_frames)
TOO_LARGE = "put it on a volume or a filesystem the nodes share"  # what to do with a file over a batch


class Listing(NamedTuple):
    files: dict[str, list]  # relpath -> [size, token, mode] of every file of the tree
    frame: bytes  # ``files`` as canonical JSON (sorted, compact): how it travels
    digest: str  # xxh3-128 of ``frame``


class Batch(NamedTuple):
    send: list[str]  # the relpaths of this batch, in the order of ``frames``
    frames: list[bytes]  # their contents
    more: bool  # the peer lacks more than this batch: it asks again once it has these


class Listings:
    """Content tokens of the files of the trees listed so far (only of the files each tree
    had when last listed). Safe from threads: a tree listed twice at once at worst hashes
    a file twice."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, tuple[Stat, str]]] = {}  # tree -> relpath -> (stat key, token)

    def listing(self, root: str) -> Listing:
        """Every regular file under ``root`` (never through a link), with its token."""
        known, now, files = self.tokens.get(root, {}), {}, {}
        with Tree(root) as tree:
            for rel, st in _walk(root, NOISE):
                key = _key(st)
                token = known[rel][1] if rel in known and known[rel][0] == key else None
                if token is None:
                    try:
                        token = xxhash.xxh3_128_hexdigest(tree.read(rel, st.st_size))
                    except (FileNotFoundError, BadPath):  # gone (or swapped) since the walk: not there
                        continue
                now[rel] = (key, token)
                files[rel] = [st.st_size, token, _perm(st.st_mode)]
        self.tokens[root] = now
        frame = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
        return Listing(files, frame, xxhash.xxh3_128_hexdigest(frame))

    @staticmethod
    def batch(
        root: str,
        files: Mapping[str, list],
        have: Mapping[str, str],
        most: int,
        per_answer: int = FILES_PER_ANSWER,
        too_large: str = TOO_LARGE,
    ) -> Batch:
        """The files of ``files`` (a ``listing``) whose token is not the one ``have``
        (relpath -> token) gives: at most ``per_answer`` of them and ``most`` bytes. A file
        over ``most`` bytes could never travel: WorkspaceError, saying ``too_large``."""
        send, frames, more, left = [], [], False, most
        with Tree(root) as tree:
            for rel, (size, token, _mode) in files.items():
                if have.get(rel) == token:
                    continue
                if size > most:
                    raise WorkspaceError(
                        f"{rel} is larger than Workspaces.max_fetch_bytes ({most} bytes): too large to copy to a "
                        f"worker on another node; {too_large}"
                    )
                if size > left or len(send) >= per_answer:
                    more = True
                    break
                try:
                    data = tree.read(rel, size)
                except (FileNotFoundError, BadPath):  # gone since listed: the next listing says so
                    continue
                left -= len(data)
                send.append(rel)
                frames.append(data)
        return Batch(send, frames, more)
