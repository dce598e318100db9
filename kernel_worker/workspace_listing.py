"""A tree's listing with content tokens, and the files a peer lacks, in bounded batches:
what the daemon sends a worker that keeps its own copy of a tree over its socket (a Slurm
node without a shared filesystem; ``kernel_worker/daemon/mirror.py``).

A token is the xxh3-128 of a file's contents, kept per file until its stat (size, mtime,
ctime, inode) changes, so an unchanged tree costs one ``lstat`` per file and no reading.
``__pycache__`` and ``.ipynb_checkpoints`` are never listed: Python and Jupyter write them
by themselves on either side.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import xxhash

from kernel_worker.workspace_tree import NOISE, Stat, Tree, WorkspaceError, _key, _perm, _walk

FILES_PER_ANSWER = 1000  # files in one message, well under a message's most frames (Limits.max_frames)


class Answer(NamedTuple):
    listing: dict[str, list]  # relpath -> [size, token, mode] of every file of the tree
    send: list[str]  # the relpaths of this batch, in the order of ``frames``
    frames: list[bytes]  # their contents
    more: bool  # the peer lacks more than this batch: it asks again once it has these


class Listings:
    """Content tokens of the files of the trees listed so far. Not thread-safe per tree:
    the daemon lists one tree for one worker at a time."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, str], tuple[Stat, str]] = {}  # (tree, relpath) -> (stat key, token)

    def answer(self, root: str, have: Mapping[str, str], most: int, per_answer: int = FILES_PER_ANSWER) -> Answer:
        """``root``'s listing and the files (at most ``per_answer`` and ``most`` bytes) whose
        token is not the one ``have`` (relpath -> token) gives. A file over ``most`` bytes
        could never travel: WorkspaceError."""
        listing, send, frames, more = {}, [], [], False
        left = most
        with Tree(root) as tree:
            for rel, st in _walk(root, NOISE):
                token = self.token(tree, root, rel, st)
                listing[rel] = [st.st_size, token, _perm(st.st_mode)]
                if have.get(rel) == token or more:
                    continue
                if st.st_size > most:
                    raise WorkspaceError(
                        f"{rel} is larger than Workspaces.max_fetch_bytes ({most} bytes): too large to copy to a "
                        "worker on another node; put it on a volume or a filesystem the nodes share"
                    )
                if st.st_size > left or len(send) >= per_answer:
                    more = True
                    continue
                data = tree.read(rel, st.st_size)
                left -= len(data)
                send.append(rel)
                frames.append(data)
        return Answer(listing, send, frames, more)

    def token(self, tree: Tree, root: str, rel: str, st: object) -> str:
        """The token of file ``rel`` of ``tree`` (opened at ``root``), whose lstat is ``st``."""
        known = self.tokens.get((root, rel))
        if known is not None and known[0] == _key(st):
            return known[1]
        token = xxhash.xxh3_128_hexdigest(tree.read(rel, st.st_size))
        self.tokens[(root, rel)] = (_key(st), token)
        return token
