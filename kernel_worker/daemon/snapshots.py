"""Scale to zero without losing the namespace: before an idle session's worker is stopped
(and on ``%gpu release --keep``, and before the daemon shuts down) the worker writes its
namespace to the user's snapshot store; the notebook's next session restores it before
its first cell runs.

The store: ``root/USER/NOTEBOOK-KEY/ID/`` (every level 0700), the worker's
``manifest.json`` and data files (``kernel_worker.snapshot``) beside the daemon's own
``meta.json`` (notebook, device, why, when). A snapshot directory without both is
incomplete and ignored. Per user, ``quota_bytes`` bounds the store: the oldest go first,
with a note. A notebook released without a snapshot starts fresh next time (a ``fresh``
marker), unless a snapshot is asked for by id.
"""

from __future__ import annotations

import asyncio
import datetime
import glob
import hashlib
import os
import re
import shutil
import time
from typing import TYPE_CHECKING

from traitlets import Bool, Float, Int, Unicode, default
from traitlets.config import LoggingConfigurable

from kernel_worker import filestream
from kernel_worker import protocol as P
from kernel_worker.backends.docker_owner import handed_dir, worker_owner
from kernel_worker.daemon import paths
from kernel_worker.daemon.errors import UnsafePath
from kernel_worker.daemon.snapshot_files import SnapshotRefused, copy_files, read_json, remove, size_of, write_json
from kernel_worker.session import WARM_PREFIX, Session
from kernel_worker.workspace import Workspaces
from kernel_worker.workspace_tree import human

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
META = "meta.json"
MANIFEST = "manifest.json"
FRESH = "fresh"  # in a notebook's directory: its last session ended without a snapshot


class Snapshots(LoggingConfigurable):
    root = Unicode(help="Where snapshots are kept, per user and notebook. Default: <state_dir>/snapshots").tag(
        config=True
    )
    on_idle_release = Bool(
        True, help="Snapshot a session's namespace before an idle release, and restore it at the notebook's next cell."
    ).tag(config=True)
    quota_bytes = Int(50 * 1024**3, help="Snapshot bytes kept per user; past it the oldest are deleted.").tag(
        config=True
    )
    keep_per_notebook = Int(3, help="Snapshots kept per notebook (the newest).").tag(config=True)
    timeout = Float(900.0, help="Seconds a worker may take to write or restore a snapshot before it is given up.").tag(
        config=True
    )
    lazy_bytes = Int(
        16 * 1024**2,
        help="Values larger than this are restored when a cell first reads them, not before the first cell.",
    ).tag(config=True)

    @default("root")
    def _root(self) -> str:
        return os.path.join(self.d.state_dir, "snapshots")

    def __init__(self, daemon: WorkerDaemon, **kw: object):
        self.d = daemon
        super().__init__(parent=daemon, **kw)
        self.writing: dict[str, asyncio.Future] = {}  # notebook dir -> done once its snapshot is written
        self.chosen: dict[str, str] = {}  # session id -> the snapshot `%gpu restore ID` picked for its next start
        self.reading: dict[str, str] = {}  # session id -> the snapshot its worker may still read lazily: kept

    # ------------------------------------------------------------------ where

    def notebook_dir(self, user: str, notebook: str, session: str) -> str:
        """``user``'s directory for this notebook (its session id when it has no name)."""
        key = hashlib.sha256(f"{notebook or 'session:' + session}".encode("utf-8", "replace")).hexdigest()[:24]
        udir = paths.private_dir(paths.child(paths.private_dir(self.root), Workspaces.user_part(user)))
        return paths.private_dir(paths.child(udir, key))

    def _complete(self, nbdir: str) -> list[tuple[str, dict]]:
        """(id, meta) of the notebook's complete snapshots, newest first."""
        out = []
        for name in os.listdir(nbdir) if os.path.isdir(nbdir) else []:
            if not ID_RE.match(name):
                continue
            meta = read_json(os.path.join(nbdir, name, META))
            if meta is not None and os.path.isfile(os.path.join(nbdir, name, MANIFEST)):
                out.append((name, meta))
        return sorted(out, key=lambda x: (float(x[1].get("at") or 0.0), x[0]), reverse=True)  # two in one second

    def list(self, user: str, notebook: str, session: str) -> list[dict]:
        nbdir = self.notebook_dir(user, notebook, session)
        return [{"id": sid, **meta} for sid, meta in self._complete(nbdir)]

    def find(self, user: str, sid: str) -> str:
        """The directory of ``user``'s snapshot ``sid`` (of any of their notebooks)."""
        if not isinstance(sid, str) or not ID_RE.match(sid):
            raise SnapshotRefused(f"{str(sid)[:40]!r} is not a snapshot id (`%gpu snapshots` lists them)")
        udir = paths.private_dir(paths.child(paths.private_dir(self.root), Workspaces.user_part(user)))
        for nb in os.listdir(udir):
            path = os.path.join(udir, nb, sid)
            if os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isfile(os.path.join(path, META)):
                return path
        raise SnapshotRefused(f"you have no snapshot {sid} (`%gpu snapshots` lists this notebook's)")

    def to_restore(self, s: Session, content: dict) -> str:
        """The snapshot a new session of this notebook starts from, or "" (none, ``--fresh``,
        or the notebook's last session was released without one)."""
        if content.get("fresh") or not self.on_idle_release:
            return ""
        nbdir = self.notebook_dir(s.user, s.notebook, s.id)
        if os.path.exists(os.path.join(nbdir, FRESH)):
            return ""
        found = self._complete(nbdir)
        return os.path.join(nbdir, found[0][0]) if found else ""

    # ------------------------------------------------------------------ the notebook's requests

    async def handle(self, ident: bytes, msg: P.Message, user: str) -> None:
        """``%gpu snapshot`` (take one now), ``%gpu snapshots`` (list this notebook's),
        ``%gpu restore [ID]`` (into the idle worker now, or at the next start)."""
        op, s = msg.content.get("op"), self.d.sessions.live.get(msg.session)
        notebook = str(msg.content.get("notebook") or (s.notebook if s else ""))[:512]
        if not msg.session:
            self.d.front.fail(ident, msg, P.Err.BAD_MESSAGE, "snapshot requests need a session id")
            return
        try:
            if op == "list":
                result: dict = {"snapshots": self.list(user, notebook, msg.session)}
            elif op == "take":
                if s is None or s.state != "idle":
                    why = "is busy: wait for its cell" if s else "has no worker: run a %%gpu cell first"
                    raise SnapshotRefused(f"nothing to snapshot: this notebook's session {why}")
                s.last_active = time.monotonic()  # not idle: the reaper leaves it be meanwhile
                result = await self.take(s, "asked")
            elif op == "restore":
                sid = msg.content.get("id")
                found = self.list(user, notebook, msg.session)
                if not sid and not found:
                    raise SnapshotRefused("this notebook has no snapshot to restore (`%gpu snapshots` lists them)")
                path = self.find(user, sid or found[0]["id"])
                if s is not None and s.state == "idle":
                    result = await self.restore(s, path)
                else:  # the next start begins from it
                    self.chosen[msg.session] = path
                    result = {"chosen": os.path.basename(path)}
            else:
                raise SnapshotRefused(f"unknown snapshot operation {str(op)[:20]!r}; use take, list, restore")
        except SnapshotRefused as e:
            self.d.front.fail(ident, msg, P.Err.SNAPSHOT, str(e))
            return
        self.d.front.reply(ident, msg, result)

    # ------------------------------------------------------------------ a session's end and start

    async def before_stop(self, s: Session, keep: bool) -> None:
        """Before ``s``'s worker is stopped: a snapshot if asked and it can be had (an idle,
        connected worker of a notebook's session), else the notebook's next session starts
        fresh. A snapshot that fails is logged; the release goes on."""
        self.reading.pop(s.id, None)
        if s.id.startswith(WARM_PREFIX) or s.handle is None or not s.user:
            return
        try:
            if keep and s.state == "idle" and s.ready is not None and s.ready.done():
                await self.take(s, "released")
                return
            self.forget(s)
        except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 -- reported, never blocks the release
            self.log.warning("session %s: released without a snapshot: %s", s.id, e)

    async def after_start(self, s: Session, msg: P.Message) -> dict | None:
        """A new worker of a notebook that left a snapshot: restore it before the cell. A
        store that cannot be read is reported with the cell, which runs in a fresh namespace."""
        try:
            writing = self.writing.get(self.notebook_dir(s.user, s.notebook, s.id))
            if writing is not None:  # the notebook's previous worker is still writing it
                await asyncio.wait_for(asyncio.shield(writing), self.timeout)
            path = self.chosen.pop(s.id, "") or self.to_restore(s, msg.content)
        except (OSError, UnsafePath, asyncio.TimeoutError) as e:
            self.log.warning("session %s: the snapshot store could not be read: %s", s.id, e)
            return {"failed": f"the snapshot store on the daemon's host could not be read ({e}); tell its operator"}
        return await self.restore(s, path) if path else None

    def _for_worker(self, s: Session, path: str, kind: str) -> tuple[str, str]:
        """(the host directory ``s``'s worker writes or reads, its path there): the store
        itself where the worker sees it (process backend), else a stage in its bulk
        directory (docker), else ("", ""): the files travel over its socket (a Slurm node
        without a shared filesystem)."""
        backend, bulk = self.d.backend_instance, self.d.workers.bulk_dir(s.wid)
        seen = backend.worker_path(path, bulk)
        if seen:
            return path, seen
        if not backend.shares_files:
            return "", ""
        stage = os.path.join(bulk, f"{kind}-{os.path.basename(path)}")
        shutil.rmtree(stage, ignore_errors=True)  # whatever a container put there first is not ours
        stage = handed_dir(stage, worker_owner(backend))
        return stage, backend.worker_path(stage, bulk)

    # ------------------------------------------------------------------ take

    async def take(self, s: Session, why: str) -> dict:
        """Ask ``s``'s (idle) worker to write its namespace; the snapshot's summary."""
        nbdir = self.notebook_dir(s.user, s.notebook, s.id)
        sid = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.urandom(3).hex()}"
        path = paths.private_dir(os.path.join(nbdir, sid))
        done = self.writing[nbdir] = asyncio.get_running_loop().create_future()
        t0 = time.monotonic()
        files = None
        try:
            host, seen = self._for_worker(s, path, "snapshot")
            ask = P.Message(P.Msg.SNAPSHOT, {"dir": seen, "send": not seen}, s.id)
            if not seen:  # the worker writes it on its node and sends the files ahead of its answer
                files = filestream.Receiver(path, ask.id, self.quota_bytes, refused=frozenset({META}))
            try:
                reply = await self.d.workers.ask(s, ask, self.timeout, files)
                if reply.type != P.Msg.REPLY or not reply.content.get("ok"):
                    raise SnapshotRefused(str(reply.content.get("error") or reply.content.get("evalue") or "failed"))
                if files is not None:  # every file it named, whole, and synced
                    await asyncio.wait_for(asyncio.to_thread(files.finish, reply.content.get("files")), self.timeout)
            except filestream.FileStreamError as e:
                raise SnapshotRefused(str(e)) from None
            except RuntimeError as e:  # Workers.abandon: the worker ended meanwhile
                raise SnapshotRefused(f"no snapshot: the session's worker ended while writing it ({e})") from None
            if host and host != path:  # written in the worker's bulk directory: into the store, then gone from it
                try:
                    copy = asyncio.to_thread(copy_files, host, path, None, self.quota_bytes)
                    await asyncio.wait_for(copy, self.timeout)
                finally:
                    await asyncio.to_thread(shutil.rmtree, host, True)
            seconds = time.monotonic() - t0
            meta = {
                "notebook": s.notebook,
                "session": s.id,
                "device": s.device,
                "why": why,
                "at": time.time(),
                "seconds": seconds,
                "bytes": int(reply.content.get("bytes", 0)),
                "names": list(reply.content.get("names", []))[:10000],
                "left": dict(list((reply.content.get("left") or {}).items())[:1000]),
            }
            write_json(os.path.join(path, META), meta)
            remove(os.path.join(nbdir, FRESH))
            self.d.ledger.timed(s, "snapshot", seconds)
            evicted = await asyncio.to_thread(self._bound, s.user, nbdir, sid)  # walks and deletes: not on the loop
            self.log.info(
                "session %s: snapshot %s (%d names, %d bytes) in %.2f s",
                s.id,
                sid,
                len(meta["names"]),
                meta["bytes"],
                seconds,
            )
            return {"id": sid, **meta, "evicted": evicted}
        except (Exception, asyncio.CancelledError) as e:
            if files is not None:
                files.close()
            shutil.rmtree(path, ignore_errors=True)
            self.log.warning("session %s: no snapshot taken: %s", s.id, e)
            raise
        finally:
            if not done.done():
                done.set_result(None)
            if self.writing.get(nbdir) is done:
                del self.writing[nbdir]

    def sweep(self) -> None:
        """Remove snapshots a killed daemon left half written (no ``meta.json``, which is
        written last): never listed, they would only fill the quota."""
        for path in glob.glob(os.path.join(glob.escape(self.root), "*", "*", "*")):
            if ID_RE.match(os.path.basename(path)) and not os.path.isfile(os.path.join(path, META)):
                self.log.info("removing snapshot %s, left half written by a daemon that stopped", path)
                shutil.rmtree(path, ignore_errors=True)

    def forget(self, s: Session) -> None:
        """``s`` ends without a snapshot: its notebook's next session starts fresh."""
        try:
            with open(os.path.join(self.notebook_dir(s.user, s.notebook, s.id), FRESH), "w"):
                pass
        except (OSError, UnsafePath) as e:
            self.log.warning("session %s: could not mark its notebook to start fresh: %s", s.id, e)

    def _bound(self, user: str, nbdir: str, newest: str) -> list[str]:
        """Delete the notebook's snapshots past ``keep_per_notebook`` and the user's oldest
        past ``quota_bytes`` (never ``newest``). Notes on what went."""
        notes = []
        for sid, meta in self._complete(nbdir)[self.keep_per_notebook :]:
            if os.path.join(nbdir, sid) not in set(self.reading.values()):
                shutil.rmtree(os.path.join(nbdir, sid), ignore_errors=True)
        udir = os.path.dirname(nbdir)
        everything = [
            (meta.get("at", 0.0), os.path.join(udir, nb, sid), meta)
            for nb in os.listdir(udir)
            for sid, meta in self._complete(os.path.join(udir, nb))
        ]
        total = sum(size_of(path) for _, path, _ in everything)
        in_use = set(self.reading.values())  # a worker still reads its large values from these
        for _, path, meta in sorted(everything, key=lambda x: x[0]):
            if total <= self.quota_bytes or os.path.basename(path) == newest or path in in_use:
                continue
            size = size_of(path)
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            notes.append(
                f"deleted snapshot {os.path.basename(path)} of {meta.get('notebook') or 'an unnamed notebook'} "
                f"({human(size)}) to stay under the snapshot quota ({human(self.quota_bytes)})"
            )
        for note in notes:
            self.log.info("user %s: %s", user, note)
        return notes

    # ------------------------------------------------------------------ restore

    def _not_restored(self, s: Session, path: str, why: str) -> dict:
        """Said with the cell, which runs in a fresh namespace; the notebook's next start is
        fresh too (``%gpu restore ID`` tries it again), not the same failure again."""
        self.log.warning("session %s: snapshot %s not restored: %s", s.id, path, why)
        self.forget(s)
        return {"failed": why, "id": os.path.basename(path)}

    async def restore(self, s: Session, path: str) -> dict:
        """Load the snapshot at ``path`` into ``s``'s new worker. A summary of what came
        back; a snapshot that cannot be read is reported, never fatal: the cell runs in
        a fresh namespace."""
        meta = read_json(os.path.join(path, META)) or {}
        t0 = time.monotonic()
        try:
            host, seen = self._for_worker(s, path, "restore")
            msg = P.Message(P.Msg.RESTORE, {"dir": seen, "lazy_bytes": self.lazy_bytes}, s.id)
            if not seen:  # a worker on a node without the store: its files go ahead of the request
                pieces, msg.content["files"] = await asyncio.to_thread(filestream.pieces, path, msg.id, s.id)
                for piece in pieces:
                    self.d.workers.send(s, piece)
            elif host != path:  # a worker that cannot see the store reads a copy in its bulk directory
                owner = worker_owner(self.d.backend_instance)
                copy = asyncio.to_thread(copy_files, path, host, owner, self.quota_bytes)
                await asyncio.wait_for(copy, self.timeout)
            reply = await self.d.workers.ask(s, msg, self.timeout)
        except asyncio.TimeoutError:
            return self._not_restored(s, path, f"the worker did not restore it within {self.timeout:g} s")
        except Exception as e:  # noqa: BLE001 -- the worker died, a disk filled: the cell runs fresh, and says why
            return self._not_restored(s, path, str(e))
        seconds = time.monotonic() - t0
        self.d.ledger.timed(s, "restore", seconds)
        if reply.type != P.Msg.REPLY or not reply.content.get("ok"):
            why = str(reply.content.get("error") or reply.content.get("evalue") or "it could not be read")
            return self._not_restored(s, path, why)
        c = reply.content
        if c.get("lazy"):
            self.reading[s.id] = path
        return {
            "id": os.path.basename(path),
            "taken_at": meta.get("at"),
            "names": list(c.get("names", [])),
            "bytes": int(c.get("bytes", 0)),
            "lazy": list(c.get("lazy", [])),
            "left": meta.get("left") or {},
            "not_loaded": dict(c.get("failed") or {}),
            "seconds": seconds,
        }
