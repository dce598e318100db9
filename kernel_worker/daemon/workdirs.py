"""The daemon's side of the workspace sync: SYNC and FETCH requests, the workspace as a
cell's current directory, and what a cell created or changed there.

The wire (``protocol.Msg.SYNC`` / ``FETCH``), every field checked before it touches a path:

    SYNC  {"key": K, "files": []}       frames: [manifest]       -> REPLY {"need": [relpath, ...]}
    SYNC  {"key": K, "files": [r, ...]} frames: [manifest, d...] -> REPLY {"need": [], "written": n, ...}
    FETCH {"key": K, "paths": [p, ...]}                          -> REPLY {"files": [r, ...]} frames: [d...]

``manifest`` is UTF-8 JSON, relpath -> [size, content hash, mode], in a frame of its own (a
20,000-file tree would not fit ``max_header_bytes``); the daemon parses it as JSON, never
unpickles it. The first SYNC names what the workspace lacks (its content hash differs);
when it lacks nothing, that SYNC already applies the manifest (deletions, modes). The
second carries the lacking files, one frame each, in the order ``files`` names them.
K names the notebook's workspace inside the asking user's own directory: the user is
the one the front established for the connection, never a value the client sends.

On the notebook's own host the files need not travel. A first SYNC with ``"local":
true`` is answered with ``"local": true`` when this daemon copies from the notebook's
directory (``Workspaces.copy_local``, and the asker is the daemon's own OS user: no
CurveZMQ, so it proved it can read the daemon's 0600 key file; it may read what the
daemon may). The second SYNC then names the directory instead of carrying the bytes:

    SYNC  {"key": K, "files": [r...], "copy": {"root": ABS, "dev": D, "ino": I}}
          frames: [manifest, stats, d...]  -> REPLY {"need": [what could not be copied], ...}

``stats`` is JSON, relpath -> [size, mtime_ns, ctime_ns, ino] as the notebook hashed it.
The directory must be the one the notebook scanned (``st_dev``, ``st_ino``); each file
is opened a directory at a time with ``O_NOFOLLOW`` and copied in the kernel only if it
is a regular file with that stat before and after the copy. What could not be copied is
named in ``need``, and the notebook sends it as bytes in a third SYNC.

An EXECUTE with ``"workspace": K`` runs in that workspace: the daemon sets the cell's
``cwd`` to where the worker sees it (the host path for the process backend, the
container's mount for docker, where only this workspace is mounted), or, for a worker
that cannot see this host's files, asks it to keep a copy over its socket (mirror.py, which
does the same for the user's ``%gpu pip install`` packages, for every cell). After such a cell
its DONE carries ``"workspace": {"changed": n, "names": [...]}``: the files it created or
changed there, compared with the state after the last sync or cell.

Blocking file work runs in threads, bounded by ``WorkerDaemon.workspace_timeout``.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import TYPE_CHECKING, Any, Callable

from kernel_worker import protocol as P
from kernel_worker.backends.docker_owner import handed_dir, worker_owner
from kernel_worker.daemon import paths
from kernel_worker.daemon.errors import UnsafePath
from kernel_worker.daemon.mirror import cell_trees
from kernel_worker.daemon.pool import WARM_PREFIX
from kernel_worker.session import Session
from kernel_worker.workspace import (
    _KEY_RE,
    _SHA_RE,
    Local,
    Stat,
    WorkspaceError,
    Workspaces,
    check_relpath,
    human,
    shown,
)

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

MAX_MANIFEST_BYTES = 64 * 1024**2  # the manifest frame's JSON
MAX_FETCH_PATHS = 1000
CHANGED_NAMED = 20  # names of changed files a DONE carries
SPARES = ".spare"  # under Workspaces.root: empty workspaces mounted into warm containers (never a user's name)


def default_root(state_dir: str, daemon_id: str) -> str:
    """This daemon's workspaces: in its private state directory, unless that is a tmpfs
    (``$XDG_RUNTIME_DIR``), which is memory: then in the Jupyter data directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.abspath(state_dir).startswith(os.path.abspath(runtime) + os.sep):
        from jupyter_core.paths import jupyter_data_dir

        return os.path.join(jupyter_data_dir(), "jupyter-gpu", "workspaces", daemon_id)
    return os.path.join(state_dir, "workspaces")


class Workdirs:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.ws = Workspaces(parent=daemon)  # c.Workspaces.* (root, quota_bytes, max_files, max_fetch_bytes)
        if "root" not in daemon.config.get("Workspaces", {}):
            self.ws.root = default_root(daemon.state_dir, daemon.daemon_id)
        self.ws.owner = worker_owner(daemon.backend_instance)  # containers of another uid mount workspaces
        self.of_session: dict[str, tuple[str, str, str]] = {}  # session id -> (user, key, host path)
        self.cells: dict[str, str] = {}  # session id -> the id of its cell that runs in its workspace
        self.mounted: dict[str, str] = {}  # worker id -> the workspace host path its container mounts
        self.spares: dict[str, str] = {}  # warm worker id -> the empty directory it mounts
        self.snaps: dict[tuple[str, str], dict[str, Stat]] = {}  # after the last sync or cell
        self.synced = {"requests": 0, "files": 0, "bytes": 0, "copied": 0}  # for the log (and tests)

    # ------------------------------------------------------------------ helpers

    async def io(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``, blocking file work, in a thread, bounded by
        ``WorkerDaemon.workspace_timeout`` (asyncio.TimeoutError past it): the event loop
        serves everyone else meanwhile."""
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.d.workspace_timeout)

    @staticmethod
    def _key(value: Any) -> str:
        if not isinstance(value, str) or not _KEY_RE.fullmatch(value):
            raise WorkspaceError(f"{shown(value)} is not a workspace key (16-64 lowercase hex digits)")
        return value

    def _refuse(self, ident: bytes, msg: P.Message, e: BaseException) -> None:
        if isinstance(e, asyncio.TimeoutError):
            text = (
                f"the workspace {msg.type} took longer than {self.d.workspace_timeout:g} s "
                "(WorkerDaemon.workspace_timeout); the daemon's disk may be slow or the tree too large"
            )
        elif isinstance(e, (WorkspaceError, UnsafePath)):
            text = str(e)
        else:
            text = f"the workspace {msg.type} failed: {e}"
        self.log.warning("workspace %s refused for %s: %s", msg.type, msg.session or "-", text)
        self.d.front.fail(ident, msg, P.Err.WORKSPACE, text)

    def _manifest(self, frame: Any, user: str, key: str) -> dict[str, tuple]:
        """The manifest frame, parsed and checked: relpaths (each by ``check_relpath``,
        unless the workspace already holds it from an earlier sync), entry shapes, count."""
        view = memoryview(frame)
        if view.nbytes > MAX_MANIFEST_BYTES:
            raise WorkspaceError(f"the manifest is {human(view.nbytes)}, over {human(MAX_MANIFEST_BYTES)}")
        try:
            raw = json.loads(bytes(view))
        except (ValueError, RecursionError):
            raise WorkspaceError("the manifest is not JSON") from None
        if not isinstance(raw, dict):
            raise WorkspaceError("the manifest is not a JSON object of relpath -> [size, hash, mode]")
        if len(raw) > self.ws.max_files:
            raise WorkspaceError(f"the manifest lists {len(raw)} files, over Workspaces.max_files={self.ws.max_files}")
        known = self.ws.known(user, key)
        out = {}
        for rel, entry in raw.items():
            if rel not in known:
                check_relpath(rel)
            if not (isinstance(entry, list) and len(entry) == 3):
                raise WorkspaceError(f"manifest entry for {shown(rel)} is not [size, hash, mode]")
            size, sha, mode = entry
            if type(size) is not int or size < 0 or type(mode) is not int or not 0 <= mode <= 0o7777:
                raise WorkspaceError(f"manifest entry for {shown(rel)} has a bad size or mode")
            if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
                raise WorkspaceError(f"manifest entry for {shown(rel)} has no content hash")
            out[rel] = (size, sha, mode)
        return out

    # ------------------------------------------------------------------ SYNC

    async def sync(self, ident: bytes, msg: P.Message, user: str) -> None:
        try:
            key = self._key(msg.content.get("key"))
            files = msg.content.get("files")
            copy = self._copy(msg.content.get("copy"))
            first = 1 + (copy is not None)  # the manifest, and the stats of what to copy
            if (
                not isinstance(files, list)
                or not all(isinstance(f, str) for f in files)
                or len(files) != len(msg.buffers) - first
                or len(set(files)) != len(files)
            ):
                raise WorkspaceError(
                    "a sync carries its manifest in its first frame (with 'copy', the files' stats in its second), "
                    "then one frame for each file 'files' names (each once)"
                )
            local = copy + (msg.buffers[1],) if copy is not None else msg.content.get("local") is True
            sent = dict(zip(files, msg.buffers[first:]))
            done = await self.io(self._sync, user, key, msg.buffers[0], sent, local)
        except Exception as e:  # noqa: BLE001 -- every refusal is an error reply
            self._refuse(ident, msg, e)
            return
        self.d.front.reply(ident, msg, done)

    def _copies(self) -> bool:
        """Whether this daemon copies from the notebook's directory: only for its own OS
        user (without CurveZMQ every client is; with it, a key's user need not be)."""
        return self.ws.copy_local and not self.d.curve

    @staticmethod
    def _copy(value: Any) -> tuple | None:
        """A SYNC's "copy": the notebook's directory (absolute path, st_dev, st_ino)."""
        if value is None:
            return None
        root, dev, ino = (value.get(k) for k in ("root", "dev", "ino")) if isinstance(value, dict) else (0, 0, 0)
        if not (isinstance(root, str) and root.startswith("/") and len(root) <= 4096 and "\0" not in root):
            raise WorkspaceError("a sync's 'copy' names the notebook's directory by its absolute path, dev and ino")
        if type(dev) is not int or type(ino) is not int:
            raise WorkspaceError("a sync's 'copy' names the notebook's directory by its absolute path, dev and ino")
        return root, dev, ino

    def _local(self, copy: tuple, manifest: dict) -> Local:
        """The stats frame of a SYNC with "copy": relpath -> [size, mtime_ns, ctime_ns, ino]."""
        if not self._copies():
            raise WorkspaceError("this daemon does not copy from the notebook's directory: send the files")
        *where, frame = copy
        view = memoryview(frame)
        if view.nbytes > MAX_MANIFEST_BYTES:
            raise WorkspaceError(f"the stats frame is {human(view.nbytes)}, over {human(MAX_MANIFEST_BYTES)}")
        try:
            raw = json.loads(bytes(view))
        except (ValueError, RecursionError):
            raise WorkspaceError("the stats frame is not JSON") from None
        if not isinstance(raw, dict) or len(raw) > len(manifest):
            raise WorkspaceError("the stats frame is not a JSON object of relpath -> [size, mtime, ctime, ino]")
        stats = {}
        for rel, v in raw.items():
            if rel not in manifest or not (isinstance(v, list) and len(v) == 4 and all(type(x) is int for x in v)):
                raise WorkspaceError(f"stats for {shown(rel)} are not [size, mtime, ctime, ino] of a manifest file")
            stats[rel] = tuple(v)
        return Local(*where, stats)

    def _sync(self, user: str, key: str, frame: Any, files: dict, local: tuple | bool = False) -> dict:
        """In a thread: the lacking relpaths, or (with them, or when none lack) the apply.
        ``local``: True for a first SYNC that offers to copy, else (root, dev, ino, stats)."""
        manifest = self._manifest(frame, user, key)
        if not files and not isinstance(local, tuple):
            have = self.ws.have(user, key)
            need = [rel for rel, e in manifest.items() if have.get(rel) != e[1]]
            if need:
                return {"need": need, **({"local": self._copies()} if local else {})}
        copy = self._local(local, manifest) if isinstance(local, tuple) else None
        done = self.ws.apply(user, key, manifest, files, copy)
        self.snaps[(user, key)] = self.ws.snapshot(user, key)
        sent = sum(memoryview(d).nbytes for d in files.values())
        copied = len(done["written"]) - len(files)
        self.synced["requests"] += 1
        self.synced["files"] += len(files)
        self.synced["bytes"] += sent
        self.synced["copied"] += copied
        self.log.info(
            "workspace sync for %s/%s: %d file(s) written (%s sent, %d copied on this host), %d deleted, %d kept%s",
            Workspaces.user_part(user),
            key[:12],
            len(done["written"]),
            human(sent),
            copied,
            len(done["deleted"]),
            len(done["kept"]),
            f", {len(done['need'])} to be sent" if done.get("need") else "",
        )
        need = done.get("need", [])
        return {"need": need, "written": len(done["written"]), "deleted": len(done["deleted"]), "kept": done["kept"]}

    # ------------------------------------------------------------------ FETCH

    async def fetch(self, ident: bytes, msg: P.Message, user: str) -> None:
        try:
            key = self._key(msg.content.get("key"))
            wanted = msg.content.get("paths")
            if (
                not isinstance(wanted, list)
                or not 0 < len(wanted) <= MAX_FETCH_PATHS
                or not all(isinstance(p, str) and 0 < len(p) <= 4096 for p in wanted)
            ):
                raise WorkspaceError(f"a fetch names 1-{MAX_FETCH_PATHS} paths or patterns")
            files = await self.io(self.ws.read, user, key, wanted)
        except Exception as e:  # noqa: BLE001
            self._refuse(ident, msg, e)
            return
        self.d.front.send(ident, msg.reply(P.Msg.REPLY, {"files": list(files)}, list(files.values())))

    # ------------------------------------------------------------------ cells

    def wrap_execute(self, run: Callable) -> Callable:
        """The EXECUTE handler, with ``"workspace": K`` turned into the cell's cwd, and, for a
        worker that cannot see this host's files, ``"mirror"``: the trees it keeps its own
        copy of (the workspace, the user's packages), brought up to date before the cell."""

        def handle(ident: bytes, msg: P.Message, user: str) -> Any:
            key = msg.content.pop("workspace", None)
            msg.content.pop("mirror", None)  # the daemon's to say, never the client's
            self.cells.pop(msg.session, None)
            if key is None and msg.session not in self.d.sessions.live:
                self.of_session.pop(msg.session, None)  # a worker started for a cell without it does not mount it
            if key is not None and msg.session:
                try:
                    host = self.ws.path(user, self._key(key))  # made 0700 if new: a few mkdirs
                except Exception as e:  # noqa: BLE001
                    self._refuse(ident, msg, e)
                    return None
                known = self.of_session.get(msg.session)
                self.of_session[msg.session] = (user, key, host)
                self.cells[msg.session] = msg.id
                s = self.d.sessions.live.get(msg.session)
                if known != (user, key, host) and s is not None and s.state in ("idle", "busy", "adopting"):
                    self.d.records.save(s)  # a restarted daemon answers its worker's copy of it
                if self.d.backend_instance.shares_files and (cwd := self._cwd(msg.session, host)):
                    msg.content["cwd"] = cwd
            if msg.session and not self.d.backend_instance.shares_files:  # copies, over the worker's socket
                msg.content["mirror"] = cell_trees(key is not None)
            return run(ident, msg, user)

        return handle

    def key_of(self, session: str) -> str:
        """The key of ``session``'s workspace ('' for none), for its record."""
        got = self.of_session.get(session)
        return got[1] if got is not None else ""

    def adopted(self, s: Session, key: Any) -> None:
        """After a restart: ``s``'s workspace, from its record (checked like a client's)."""
        try:
            self.of_session[s.id] = (s.user, key, self.ws.path(s.user, self._key(key)))
        except (WorkspaceError, OSError, UnsafePath) as e:
            self.log.warning("session %s: its record's workspace is not usable: %s", s.id, e)

    def _cwd(self, session: str, host: str) -> str:
        """Where the session's worker sees the workspace ('' when it cannot: a container
        started before this notebook synced, without the mount)."""
        backend = self.d.backend_instance
        s = self.d.sessions.live.get(session)
        if getattr(backend, "mounts_workspace", False) and s is not None and s.handle is not None:
            if self.mounted.get(s.wid) != host:
                return ""
        return backend.workspace_cwd(host)

    def mount_for(self, wid: str) -> str:
        """For a backend starting worker ``wid``: the host path of its session's workspace
        ('' for none); remembered, so cells know the container sees it."""
        got = self.of_session.get(wid)
        if got is None and wid.startswith(WARM_PREFIX):  # a warm worker: an empty spare, adopted when taken
            spares = paths.private_dir(os.path.join(paths.private_dir(self.ws.root), SPARES))
            spare = self.spares[wid] = handed_dir(paths.child(spares, wid), self.ws.owner)
            self.mounted[wid] = spare
            return spare
        if got is None:
            self.mounted.pop(wid, None)
            return ""
        self.mounted[wid] = got[2]
        return got[2]

    def before_cell(self, s: Session) -> None:
        """A warm container taken by a session that syncs mounts an empty spare directory:
        the workspace's files move into it and it takes the workspace's place (renames on
        one file system), so the container sees this workspace and no other."""
        spare = self.spares.get(s.wid)
        got = self.of_session.get(s.id)
        if spare is None or got is None or s.id not in self.cells:
            return
        user, key, host = got
        del self.spares[s.wid]
        try:
            self.ws.take_spare(user, key, spare)
            self.mounted[s.wid] = host
            self.snaps[(user, key)] = self.ws.snapshot(user, key)  # the moves changed top-level ctimes
        except (OSError, UnsafePath) as e:
            self.log.warning("could not give warm worker %s the workspace of session %s: %s", s.wid, s.id, e)

    def after_cell(self, s: Session, msg: P.Message) -> bool:
        """For a DONE: when its cell ran in the workspace, relay it (True) once the files it
        created or changed are counted, in a thread; else False (the caller relays). A DONE
        sent again by an adopted worker, for the cell it ran before the restart, is not this
        one's (another cell may have come meanwhile), but waits for the files it sent back."""
        mine = self.cells.get(s.id) == msg.parent
        sent_back = s.id in self.d.mirrors.writing and s.id in self.of_session
        if msg.content.get("exit") or not (mine or sent_back):
            return False
        if mine:
            del self.cells[s.id]
        user, key, host = self.of_session[s.id]
        # A container sees the workspace only if it was started with it (not one started
        # before this notebook synced, nor a warm one from the pool).
        unseen = getattr(self.d.backend_instance, "mounts_workspace", False) and self.mounted.get(s.wid) != host
        self.d.spawn(self._count_then_relay(s, msg, user, key, unseen))
        return True

    async def _count_then_relay(self, s: Session, msg: P.Message, user: str, key: str, unseen: bool) -> None:
        try:
            await self.d.mirrors.written(s)  # a worker elsewhere sent back what the cell wrote
            if unseen:
                msg.content["workspace"] = {"unmounted": True}
                return
            before = self.snaps.get((user, key))
            changed, self.snaps[(user, key)] = await self.io(self.ws.changes, user, key, before or {})
            if before is not None:
                msg.content["workspace"] = {"changed": len(changed), "names": changed[:CHANGED_NAMED]}
        except Exception as e:  # noqa: BLE001 -- the cell's result matters more than the count
            self.log.warning("could not count what a cell changed in its workspace: %s", e)
        finally:
            self.d.attach.relay(s, msg)
