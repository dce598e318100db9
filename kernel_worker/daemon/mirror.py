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
import stat
from typing import TYPE_CHECKING, Any

import xxhash

from kernel_worker import protocol as P
from kernel_worker.session import Session
from kernel_worker.workspace_tree import NOISE, Tree, WorkspaceError, _key, _perm, _walk, check_relpath

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

REMEMBERED = 1000  # question ids kept, to answer each once
FILES_PER_ANSWER = 1000  # files in one message, well under a message's most frames (Limits.max_frames)


class Mirrors:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.tokens: dict[tuple[str, str, str], tuple[tuple, str]] = {}  # (user, key, rel) -> (stat key, token)
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
            self.writing.setdefault(s.id, []).append(self.d.spawn(self._back(s, msg, user, key, host), s.tasks))
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
            listing, send, frames, more = await self.d.workdirs._io(self._listing, user, key, host, have)
            content = {"files": listing, "send": send, "more": more}
        except (OSError, WorkspaceError) as e:
            self.log.warning("session %s: its workspace could not be read for its worker: %s", s.id, e)
            content, frames = {"error": str(e)}, []
        self.d.workers.send(s, msg.reply(P.Msg.MIRROR, content, frames))

    def _listing(self, user: str, key: str, host: str, have: dict) -> tuple[dict, list, list, bool]:
        """The workspace's listing, the files (at most FILES_PER_ANSWER and
        ``Workspaces.max_fetch_bytes``) the worker lacks, and whether it lacks more: it asks
        again once it has these."""
        listing, send, frames, more = {}, [], [], False
        most = left = self.d.workdirs.ws.max_fetch_bytes
        with Tree(host) as tree:
            for rel, st in _walk(host, NOISE):
                token = self._token(tree, user, key, rel, st)
                listing[rel] = [st.st_size, token, _perm(st.st_mode)]
                if have.get(rel) == token or more:
                    continue
                if st.st_size > most:
                    raise WorkspaceError(
                        f"{rel} is larger than Workspaces.max_fetch_bytes ({most} bytes): too large to copy to a "
                        "worker on another node; put it on a volume or a filesystem the nodes share"
                    )
                if st.st_size > left or len(send) >= FILES_PER_ANSWER:
                    more = True
                    continue
                data = tree.read(rel, st.st_size)
                left -= len(data)
                send.append(rel)
                frames.append(data)
        return listing, send, frames, more

    def _token(self, tree: Tree, user: str, key: str, rel: str, st: Any) -> str:
        known = self.tokens.get((user, key, rel))
        if known is not None and known[0] == _key(st):
            return known[1]
        token = xxhash.xxh3_128_hexdigest(tree.read(rel, st.st_size))
        self.tokens[(user, key, rel)] = (_key(st), token)
        return token

    # ------------------------------------------------------------------ from the worker

    async def _back(self, s: Session, msg: P.Message, user: str, key: str, host: str) -> None:
        try:
            await self.d.workdirs._io(self._write_back, user, key, host, msg)
        except (OSError, ValueError) as e:  # a bad relpath, the quota: the cell's result still counts
            self.log.warning("session %s: what its cell wrote in its workspace was refused: %s", s.id, e)
        except Exception:  # a bug: the cell's result still counts, and the log says what happened
            self.log.exception("session %s: what its cell wrote in its workspace could not be written", s.id)
        left = msg.content.get("left") or []
        if left:
            self.log.info("session %s: %d file(s) too large to send back stay on its worker", s.id, len(left))

    def _write_back(self, user: str, key: str, host: str, msg: P.Message) -> None:
        back, gone = msg.content.get("back"), msg.content.get("gone")
        if not isinstance(back, dict) or not isinstance(gone, list) or len(back) != len(msg.buffers):
            raise ValueError("a malformed workspace mirror message")
        files = {check_relpath(rel): (data, spec) for (rel, spec), data in zip(back.items(), msg.buffers)}
        gone = [check_relpath(rel) for rel in gone]
        ws = self.d.workdirs.ws
        with ws._lock(user, key):
            ws._check_quota(user, key, {rel: memoryview(d).nbytes for rel, (d, _) in files.items()}, gone)
            with Tree(host, owner=ws.owner) as tree:
                for rel, (data, spec) in files.items():
                    mode = spec[1] if isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], int) else 0o600
                    tree.write(rel, data, mode)
                for rel in gone:
                    try:
                        if stat.S_ISREG(tree.lstat(rel).st_mode):
                            tree.unlink(rel)
                    except FileNotFoundError:
                        pass
            ws._bydir.pop((user, key), None)
