"""The daemon's side of a workspace mirrored over the socket (kernel_worker/executor/mirror.py),
for workers that cannot see this host's files (``Backend.shares_files`` false: Slurm nodes
without a shared filesystem).

A worker's MIRROR ``have`` is answered with the workspace's whole listing (relpath ->
[size, token, mode], tokens being xxh3-128 of the contents, kept per file until its
stat changes) and the files whose token the worker lacks. A MIRROR ``back`` writes what
the cell created or changed into the workspace, as a cell on this host would have (not
as synced files: the notebook's next sync leaves them be), and removes what it removed;
every relpath is checked, the writes count against the user's quota, and the cell's
reply waits for them, so its count of changed files and a ``%gpu fetch`` see them.
Blocking file work runs in a thread.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from kernel_worker import protocol as P
from kernel_worker.session import Session
from kernel_worker.workspace_listing import FILES_PER_ANSWER, Listings
from kernel_worker.workspace_tree import WorkspaceError

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

REMEMBERED = 1000  # question ids kept, to answer each once
__all__ = ["FILES_PER_ANSWER", "Mirrors"]


class Mirrors:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.listings = Listings()  # content tokens, kept per file until its stat changes
        self.writing: dict[str, list[asyncio.Task]] = {}  # session id -> its cell's files being written back
        self.asked: dict[str, None] = {}  # questions answered or being answered, oldest first

    def handle(self, s: Session, msg: P.Message) -> None:
        """A worker's MIRROR for the cell it runs."""
        got = self.d.workdirs.of_session.get(s.id)
        if got is None:
            self.log.warning("session %s: a workspace mirror request for a cell without a workspace", s.id)
            return
        user, key, host = got
        if "back" in msg.content:
            self.writing.setdefault(s.id, []).append(self.d.spawn(self._back(s, msg, user, key), s.tasks))
        elif msg.id not in self.asked:  # a worker asks again until answered: once is enough
            self.asked[msg.id] = None
            while len(self.asked) > REMEMBERED:
                del self.asked[next(iter(self.asked))]
            self.d.spawn(self._answer(s, msg, user, key, host), s.tasks)

    async def written(self, s: Session) -> None:
        """Until the files ``s``'s cell sent back are in its workspace."""
        tasks = self.writing.pop(s.id, [])
        if tasks:
            await asyncio.wait(tasks, timeout=self.d.workspace_timeout)

    # ------------------------------------------------------------------ to the worker

    async def _answer(self, s: Session, msg: P.Message, user: str, key: str, host: str) -> None:
        have = msg.content.get("have")
        have = have if isinstance(have, dict) else {}
        try:
            most = self.d.workdirs.ws.max_fetch_bytes  # a batch's bytes; the worker asks again for more
            listing, send, frames, more = await self.d.workdirs.io(self.listings.answer, host, have, most)
            content = {"files": listing, "send": send, "more": more}
        except (OSError, WorkspaceError) as e:
            self.log.warning("session %s: its workspace could not be read for its worker: %s", s.id, e)
            content, frames = {"error": str(e)}, []
        self.d.workers.send(s, msg.reply(P.Msg.MIRROR, content, frames))

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
