"""The daemon's side of the trees a worker keeps its own copy of over its socket
(kernel_worker/executor/mirror.py), for workers that cannot see this host's files
(``Backend.shares_files`` false: Slurm nodes without a shared filesystem). Two trees:
``workspace``, the notebook's synced directory (the cell's cwd), both ways; and
``packages``, the user's ``%gpu pip install`` directory for the worker's Python, one way:
a worker's copy of it is read-only, never written back.

A cell whose EXECUTE says ``mirror: {"workspace": bool, "packages": bool}`` makes its
worker ask, tree by tree, before the cell runs:

    MIRROR {"tree": T, "python": "3.11"}  frames: [have]    -> MIRROR {"send": [...], "more": b, "digest": D}
                                                                frames: [listing, contents...]
    MIRROR {"tree": T, "python": "3.11", "listed": D}        -> MIRROR {"same": true} | {"stale": true}

``have`` is JSON, relpath -> the content token the worker holds; ``listing`` is JSON,
relpath -> [size, token, mode] of the whole tree (``workspace_listing``), both in frames
of their own (a tree of many thousands of files outgrows a header). Tokens are xxh3-128
of the contents, kept per file until its stat changes; the batch is the files whose token
the worker lacks, at most FILES_PER_ANSWER files and ``Workspaces.max_fetch_bytes``, and
the worker asks again while ``more``. A worker whose copy is exactly the listing of digest
D says only ``listed: D``: an unchanged tree costs one listing and one comparison here;
changed, it is told ``stale`` and asks with its ``have``.

After the cell, a MIRROR ``back`` (workspace only) writes what the cell created or changed
into the workspace, as a cell on this host would have (not as synced files: the notebook's
next sync leaves them be), and removes what it removed; every relpath is checked, the
writes count against the user's quota, and the cell's reply waits for them, so its count
of changed files and a ``%gpu fetch`` see them. The worker and the code in its cell are
hostile: the tree is one of the two names, the packages directory is the session's own
user's (never a name the worker sends) and nothing is ever written there. Blocking file
work runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from kernel_worker import protocol as P
from kernel_worker.daemon.errors import UnsafePath
from kernel_worker.daemon.packages import PYTHON_RE
from kernel_worker.session import Session
from kernel_worker.workspace_listing import FILES_PER_ANSWER, TOO_LARGE, Listings
from kernel_worker.workspace_tree import PACKAGES, WORKSPACE, WorkspaceError, human, shown

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

REMEMBERED = 1000  # question and write-back ids kept, to take each once
MAX_HAVE_BYTES = 64 * 1024**2  # a worker's ``have`` frame (JSON)
PACKAGES_TOO_LARGE = "install it in the cluster's Python (SlurmBackend.python) instead"
__all__ = ["FILES_PER_ANSWER", "Mirrors", "PACKAGES", "WORKSPACE"]


def cell_trees(workspace: bool) -> dict[str, bool]:
    """An EXECUTE's ``mirror`` for a worker that cannot see this host's files: its packages
    always (one comparison when unchanged), the workspace when the cell runs in one."""
    return {WORKSPACE: workspace, PACKAGES: True}


class Mirrors:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.listings = Listings()  # content tokens, kept per file until its stat changes
        self.writing: dict[str, list[asyncio.Task]] = {}  # session id -> its cell's files being written back
        self.asked: dict[str, None] = {}  # questions answered or being answered, oldest first

    def handle(self, s: Session, msg: P.Message) -> None:
        """A worker's MIRROR for the cell it runs."""
        tree = msg.content.get("tree", WORKSPACE)
        if not isinstance(tree, str) or tree not in (WORKSPACE, PACKAGES):
            self.log.warning("session %s: its worker asked to mirror %s, not a tree it may have", s.id, shown(tree))
            return
        got = self.d.workdirs.of_session.get(s.id)
        if tree == WORKSPACE and got is None:
            self.log.warning("session %s: a workspace mirror request for a cell without a workspace", s.id)
            return
        if "back" in msg.content:
            if not self._first(msg.id):  # sent again after a reconnect: written already
                return
            if tree != WORKSPACE:
                self.log.warning(
                    "session %s: refused what its worker sent back for its %s: a worker's copy of them is read-only",
                    s.id,
                    tree,
                )
            else:
                user, key, _host = got
                self.writing.setdefault(s.id, []).append(self.d.spawn(self._back(s, msg, user, key), s.tasks))
            return
        if self._first(msg.id):  # a worker asks again until answered: once is enough
            root = got[2] if tree == WORKSPACE else None  # the packages': found in a thread
            self.d.spawn(self._answer(s, msg, tree, root), s.tasks)

    def _first(self, msg_id: str) -> bool:
        """Whether this is the first time a worker's question or write-back ``msg_id`` came."""
        if msg_id in self.asked:
            return False
        self.asked[msg_id] = None
        while len(self.asked) > REMEMBERED:
            del self.asked[next(iter(self.asked))]
        return True

    async def written(self, s: Session) -> None:
        """Until the files ``s``'s cell sent back are in its workspace."""
        tasks = self.writing.pop(s.id, [])
        if tasks:
            await asyncio.wait(tasks, timeout=self.d.workspace_timeout)

    # ------------------------------------------------------------------ to the worker

    async def _answer(self, s: Session, msg: P.Message, tree: str, root: str | None) -> None:
        try:
            content, frames = await self.d.workdirs.io(self._listed, s.user, msg, tree, root)
        except (OSError, WorkspaceError, UnsafePath, asyncio.TimeoutError) as e:
            why = str(e) or f"longer than WorkerDaemon.workspace_timeout ({self.d.workspace_timeout:g} s)"
            self.log.warning("session %s: its %s could not be read for its worker: %s", s.id, tree, why)
            content, frames = {"error": why}, []
        if content.get("send"):
            sent = sum(len(f) for f in frames[1:])
            more = ", more to come" if content.get("more") else ""
            self.log.info(
                "session %s: %d file(s) of its %s sent to its worker (%s)%s",
                s.id,
                len(content["send"]),
                tree,
                human(sent),
                more,
            )
        self.d.workers.send(s, msg.reply(P.Msg.MIRROR, {"tree": tree, **content}, frames))

    def _listed(self, user: str, msg: P.Message, tree: str, root: str | None) -> tuple[dict, list]:
        """In a thread: the answer to a worker's question about ``tree``."""
        if root is None:  # the session's own user's packages, for the worker's Python
            python = msg.content.get("python")
            if not isinstance(python, str) or not PYTHON_RE.fullmatch(python):
                raise WorkspaceError(f"{shown(python)} is not a Python version (3.X)")
            root = self.d.packages.dir_for(user, python)
        listing = self.listings.listing(root)
        listed = msg.content.get("listed")
        if listed is not None:
            return ({"same": True} if listed == listing.digest else {"stale": True}), []
        have = _have(msg)
        too_large = PACKAGES_TOO_LARGE if tree == PACKAGES else TOO_LARGE
        most = self.d.workdirs.ws.max_fetch_bytes  # a batch's bytes; the worker asks again for more
        batch = self.listings.batch(root, listing.files, have, most, FILES_PER_ANSWER, too_large)
        content = {"send": batch.send, "more": batch.more, "digest": listing.digest}
        return content, [listing.frame, *batch.frames]

    # ------------------------------------------------------------------ from the worker

    async def _back(self, s: Session, msg: P.Message, user: str, key: str) -> None:
        try:
            await self.d.workdirs.io(self._write_back, user, key, msg)
        except (OSError, ValueError) as e:  # a bad relpath, the quota: the cell's result still counts
            self.log.warning("session %s: what its cell wrote in its workspace was refused: %s", s.id, e)
        except Exception:  # a bug: the cell's result still counts, and the log says what happened
            self.log.exception("session %s: what its cell wrote in its workspace could not be written", s.id)
        left = msg.content.get("left") or []
        if left:
            self.log.info("session %s: %d file(s) too large to send back stay on its worker", s.id, len(left))

    def _write_back(self, user: str, key: str, msg: P.Message) -> None:
        back, gone = msg.content.get("back"), msg.content.get("gone")
        if not isinstance(back, dict) or not isinstance(gone, list) or len(back) != len(msg.buffers):
            raise ValueError("a malformed workspace mirror message")
        files = {}
        for (rel, spec), data in zip(back.items(), msg.buffers):
            mode = spec[1] if isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], int) else 0o600
            files[rel] = (data, mode)
        self.d.workdirs.ws.write_back(user, key, files, gone)


def _have(msg: P.Message) -> dict[str, str]:
    """A question's ``have`` (relpath -> token): JSON in its one frame, parsed, never
    unpickled; its names are only compared with the listing's, never used as paths."""
    if not msg.buffers:
        return {}
    view = memoryview(msg.buffers[0])
    if len(msg.buffers) != 1 or view.nbytes > MAX_HAVE_BYTES:
        raise WorkspaceError(f"a mirror question carries one frame of at most {human(MAX_HAVE_BYTES)}")
    try:
        have: Any = json.loads(bytes(view))
    except (ValueError, RecursionError):
        raise WorkspaceError("a mirror question's frame is not JSON") from None
    if not isinstance(have, dict):
        raise WorkspaceError("a mirror question's frame is not a JSON object of relpath -> token")
    return have
