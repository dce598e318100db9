"""Per-user workspaces on the daemon's host: where a notebook's directory is mirrored when
the worker does not share the notebook's host, and the worker's current directory.

Layout: ``root/USER/KEY/tree`` is the mirror (the cell's cwd), ``root/USER/KEY/state.json``
beside it records what the sync itself wrote (relpath -> size, content hash, mode and
the stat it left), every directory 0700 and checked by ``paths.private_dir``. USER is the
user's name, or ``h`` + sha256 when the name is not a plain one (65 characters: longer
than any plain name, so the two forms never meet); KEY is a hash of the notebook's path.

Every relpath comes from a client and is hostile: ``check_relpath`` is the one rule, and
files are opened one directory at a time by file descriptor with ``O_NOFOLLOW``, so a
symlink a cell plants (or swaps in between a plan and its apply) is refused rather than
followed. Writes go to a temporary name and are renamed over the target: a cell never
sees half a file. On the notebook's host, files may instead be copied from the notebook's
directory (``apply``'s ``local``), each only while its stat is the one it was hashed with.

What is deleted: a file the manifest no longer has is removed only if the sync wrote it
and its stat is still what the sync left. Anything a cell wrote or changed is the user's
result, so it stays (and can be fetched). A synced file a cell changed is overwritten by
the next sync (the notebook's copy wins); ``changed_since`` told the user beforehand.

Needs only the standard library, traitlets and ``kernel_worker.daemon.paths``. Beside it,
one job each: ``workspace_tree``, the file-level rules (relpaths, patterns, ``Tree``), which
the notebook side imports too; ``workspace_manifest``, checking a sync's manifest;
``workspace_land``, writing or copying a sync's files; ``workspace_copy``, the same-host
copy's source; ``workspace_fetch``, reading files out for a fetch; ``workspace_listing``, a
tree's listing with content tokens, for a worker that keeps its own copy over its socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import threading
from typing import Collection, Mapping, Sequence

from traitlets import Bool, Int, Unicode, default
from traitlets.config import Configurable

from kernel_worker.backends.docker_owner import handed_dir
from kernel_worker.daemon import paths
from kernel_worker.workspace_copy import Local, open_source
from kernel_worker.workspace_fetch import read_files
from kernel_worker.workspace_land import land
from kernel_worker.workspace_manifest import check_manifest
from kernel_worker.workspace_tree import (  # noqa: F401 -- re-exported: the one place callers import from
    _KEY_RE,
    _SHA_RE,
    _TMP_PREFIX,
    _USER_RE,
    MAX_DEPTH,
    NOISE,
    STATE,
    TREE,
    BadPath,
    Data,
    QuotaExceeded,
    Stat,
    Tree,
    WorkspaceError,
    _key,
    _walk,
    check_relpath,
    glob_regex,
    human,
    shown,
    write_files,
)


class Workspaces(Configurable):
    """The daemon's per-user workspaces (see the module's docstring). Thread-safe: one lock
    per workspace, so the daemon may call it from worker threads."""

    root = Unicode(
        help="Directory holding every user's workspaces (made 0700). Default for the daemon: 'workspaces' in its "
        "state directory (WorkerDaemon.state_dir), or in the Jupyter data directory when the state directory is "
        "in $XDG_RUNTIME_DIR (memory)."
    ).tag(config=True)
    quota_bytes = Int(
        20 * 1000**3,
        help="Most bytes one user's workspaces (all their notebooks' synced copies and what cells wrote there) may "
        "hold after a sync; a sync that would pass it is refused with a message. 0: no limit.",
    ).tag(config=True)
    max_files = Int(100_000, help="Most files one notebook's manifest may list.").tag(config=True)
    max_fetch_bytes = Int(2 * 1000**3, help="Most bytes one fetch may bring back to the notebook.").tag(config=True)
    copy_local = Bool(
        True,
        help="On the notebook's own host, copy the files a sync needs from the notebook's directory (in the kernel, "
        "checked unchanged since the notebook hashed them) instead of receiving them over the socket; only for "
        "connections as the daemon's own OS user (ipc, loopback), never for CurveZMQ users.",
    ).tag(config=True)

    @default("root")
    def _root(self) -> str:
        from jupyter_core.paths import jupyter_data_dir

        return os.path.join(jupyter_data_dir(), "jupyter-gpu", "workspaces")

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.owner: tuple[int, int] | None = None  # set by the daemon: the uid workers run as, when not its own
        self._states: dict[tuple[str, str], dict[str, list]] = {}
        self._bydir: dict[tuple[str, str], dict[str, list]] = {}  # the state by directory, for have()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ where

    @staticmethod
    def user_part(user: str) -> str:
        """The directory name for ``user``: the name itself if plain, else 'h' + sha256."""
        if not isinstance(user, str) or not user:
            raise WorkspaceError(f"{shown(user)} is not a user name")
        return user if _USER_RE.fullmatch(user) else "h" + hashlib.sha256(user.encode("utf-8", "replace")).hexdigest()

    def _base(self, user: str, key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise BadPath(f"{shown(key)} is not a notebook key (16-64 lowercase hex digits)")
        udir = paths.private_dir(paths.child(paths.private_dir(self.root), self.user_part(user)))
        return paths.private_dir(paths.child(udir, key))

    def path(self, user: str, key: str) -> str:
        """``user``'s workspace for notebook ``key``: the directory a cell runs in. Made 0700."""
        return handed_dir(os.path.join(self._base(user, key), TREE), self.owner)

    def _lock(self, user: str, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((user, key), threading.Lock())

    # ------------------------------------------------------------------ state

    def known(self, user: str, key: str) -> Collection[str]:
        """The relpaths the sync wrote into ``user``'s workspace for ``key``: their names were
        checked when they were written, so a manifest naming them again need not be."""
        return self._state(user, key).keys()

    def _state(self, user: str, key: str) -> dict[str, list]:
        """relpath -> [size, sha, mode, mtime_ns, ctime_ns, ino] of what the sync wrote."""
        st = self._states.get((user, key))
        if st is None:
            st = {}
            try:
                with os.fdopen(paths.open_private(os.path.join(self._base(user, key), STATE), os.O_RDONLY)) as f:
                    files = json.load(f)["files"]
                st = {check_relpath(r): list(v) for r, v in files.items() if isinstance(v, list) and len(v) == 6}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):  # BadPath is a ValueError
                st = {}  # none or unreadable: every file counts as the cell's, so nothing is deleted
            self._states[(user, key)] = st
        return st

    def _save(self, user: str, key: str, st: dict[str, list]) -> None:
        base = self._base(user, key)
        tmp = os.path.join(base, _TMP_PREFIX + secrets.token_hex(8))
        data = memoryview(json.dumps({"v": 1, "files": st}, separators=(",", ":")).encode())
        with os.fdopen(paths.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb", buffering=0) as f:
            while data:
                data = data[f.write(data) :]
        os.replace(tmp, os.path.join(base, STATE))

    def have(self, user: str, key: str) -> dict[str, str]:
        """relpath -> content hash of the synced files still exactly as the sync left them (one
        ``fstatat`` each, relative to its directory's descriptor, no hashing): what the
        notebook need not send again. A file a cell changed or removed is missing here, so
        it is sent again."""
        tree = self.path(user, key)
        out = {}
        with self._lock(user, key), Tree(tree) as t:
            bydir = self._bydir.get((user, key))
            if bydir is None:
                bydir = self._bydir[(user, key)] = {}
                for rel, v in self._state(user, key).items():
                    d, _, name = rel.rpartition("/")
                    bydir.setdefault(d, []).append((rel, name, v))
            for d, items in bydir.items():
                try:
                    fd = t.dir(d)
                except (OSError, BadPath):
                    continue
                for rel, name, (size, sha, _mode, mt, ct, ino) in items:
                    try:
                        s = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if s.st_ino == ino and s.st_size == size and s.st_mtime_ns == mt and s.st_ctime_ns == ct:
                        out[rel] = sha
        return out

    # ------------------------------------------------------------------ sync

    def usage(self, user: str) -> int:
        """Bytes in all of ``user``'s workspaces (synced files and what cells wrote)."""
        udir = paths.child(paths.private_dir(self.root), self.user_part(user))
        return sum(s.st_size for rel, s in _walk(udir) if rel.count("/") > 1 or not rel.endswith(STATE))

    def _check_quota(self, user: str, key: str, files: Mapping[str, int], gone: list[str]) -> None:
        incoming = sum(files.values())  # relpath -> bytes to write
        if not self.quota_bytes or not incoming:
            return
        used = freed = 0  # one walk: all of the user's files, and which of this tree's the sync replaces
        mine, replaced = f"{key}/{TREE}/", {*files, *gone}
        for rel, s in _walk(paths.child(paths.private_dir(self.root), self.user_part(user))):
            if rel.count("/") > 1 or not rel.endswith(STATE):
                used += s.st_size
                freed += s.st_size if rel.startswith(mine) and rel[len(mine) :] in replaced else 0
        after = used - freed + incoming
        if after > self.quota_bytes:
            raise QuotaExceeded(
                f"workspace quota exceeded for user {user!r}: this sync would bring their workspaces to "
                f"{human(after)} ({human(used)} used now, {human(incoming)} to write), over "
                f"Workspaces.quota_bytes = {human(self.quota_bytes)}. Leave large files out with .jupyter-gpu-ignore, "
                "delete what cells wrote there, or ask the operator to raise c.Workspaces.quota_bytes"
            )

    def apply(
        self,
        user: str,
        key: str,
        manifest: Mapping[str, Sequence],
        files: Mapping[str, Data],
        local: Local | None = None,
    ) -> dict[str, list[str]]:
        """Make ``user``'s workspace for ``key`` hold ``manifest`` (relpath -> (size, hash,
        mode)): write ``files`` (relpath -> contents, for entries the workspace lacked) and,
        on the notebook's host, copy those of ``local.stats`` from the notebook's directory
        (only the caller may say that the asker may read it); delete what an earlier sync
        wrote and the manifest no longer lists, unless a cell changed it. Raises BadPath,
        QuotaExceeded or WorkspaceError before writing anything it can check first. Returns
        {"written", "deleted", "kept"} relpaths ("kept": synced files a cell changed, now
        left to the user), and with ``local`` "need": files that could not be copied (no
        longer as the notebook hashed them), to be sent."""
        base_tree = self.path(user, key)
        copy = local.stats if local is not None else {}
        with self._lock(user, key):
            st = self._state(user, key)
            chmods = check_manifest(st, manifest, files, copy, self.max_files)
            copy = {r: w for r, w in copy.items() if r not in files}
            done: dict[str, list[str]] = {"written": [], "deleted": [], "kept": [], **({"need": []} if local else {})}
            gone = [r for r in st if r not in manifest] if len(st) != len(manifest) or files or copy else []
            incoming = {r: memoryview(d).nbytes for r, d in files.items()} | {r: w[0] for r, w in copy.items()}
            with Tree(base_tree, owner=self.owner) as tree:
                self._check_quota(user, key, incoming, gone)
                src = open_source(local) if copy else None
                try:
                    self._delete(tree, st, gone, done)
                    jobs = [(r, d, manifest[r][2], None) for r, d in files.items()]
                    jobs += [(r, None, manifest[r][2], w) for r, w in copy.items()] if src else []
                    if copy and src is None:  # not the directory the notebook scanned: all to be sent
                        done["need"] += list(copy)
                    land(tree, src, st, manifest, jobs, chmods, done)
                finally:
                    if src is not None:
                        src.__exit__()
                    if gone or files or copy or chmods:
                        self._bydir.pop((user, key), None)
                        self._save(user, key, st)
            return {k: sorted(v) for k, v in done.items()}

    @staticmethod
    def _delete(tree: Tree, st: dict[str, list], gone: list[str], done: dict[str, list[str]]) -> None:
        """Remove what the sync wrote and the manifest dropped, if still as the sync left it."""
        for rel in gone:
            size, _sha, _mode, mt, ct, ino = st.pop(rel)
            try:
                s = tree.lstat(rel)
            except (OSError, BadPath):
                continue
            if (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) == (size, mt, ct, ino):
                tree.unlink(rel)
                done["deleted"].append(rel)
            else:
                done["kept"].append(rel)

    def write_back(self, user: str, key: str, files: Mapping[str, tuple[Data, int]], gone: Sequence[str]) -> None:
        """Write what a cell on a worker elsewhere created or changed (relpath -> (contents,
        mode)) into the workspace, as a cell on this host would have (not as synced files:
        the notebook's next sync leaves them be), and remove the regular files it removed.
        Every relpath is checked and the quota counted before anything is written."""
        files = {check_relpath(rel): v for rel, v in files.items()}
        gone = [check_relpath(rel) for rel in gone]
        with self._lock(user, key):
            self._check_quota(user, key, {rel: memoryview(d).nbytes for rel, (d, _) in files.items()}, gone)
            with Tree(self.path(user, key), owner=self.owner) as tree:
                for rel, (data, mode) in files.items():
                    tree.write(rel, data, mode)
                for rel in gone:
                    try:
                        if stat.S_ISREG(tree.lstat(rel).st_mode):
                            tree.unlink(rel)
                    except FileNotFoundError:
                        pass
            self._bydir.pop((user, key), None)

    def take_spare(self, user: str, key: str, spare: str) -> None:
        """Move the workspace's files into ``spare`` (an empty directory a warm container
        mounts, on the same file system) and put ``spare`` in the workspace's place, so that
        container sees this workspace and no other."""
        host = self.path(user, key)
        with self._lock(user, key):
            for name in os.listdir(host):
                os.rename(os.path.join(host, name), os.path.join(spare, name))
            os.rmdir(host)
            os.rename(spare, host)
            self._bydir.pop((user, key), None)

    # ------------------------------------------------------------------ after a cell

    def snapshot(self, user: str, key: str) -> dict[str, Stat]:
        """relpath -> (size, mtime_ns, ctime_ns, ino) of every file in the workspace; take
        one before a cell and hand it to ``changed_since`` after."""
        return {rel: _key(s) for rel, s in _walk(self.path(user, key), NOISE)}

    def changed_since(self, user: str, key: str, before: Mapping[str, Stat]) -> list[str]:
        """Files a cell created or changed since ``before`` (a ``snapshot``), sorted.
        ``__pycache__`` and ``.ipynb_checkpoints`` are not counted: Python and Jupyter write
        them by themselves."""
        return sorted(rel for rel, s in _walk(self.path(user, key), NOISE) if before.get(rel) != _key(s))

    def changes(self, user: str, key: str, before: Mapping[str, Stat]) -> tuple[list[str], dict[str, Stat]]:
        """``changed_since`` and a new ``snapshot`` from one walk: what a cell created or
        changed since ``before``, and the state the next cell is compared with."""
        now = {rel: _key(s) for rel, s in _walk(self.path(user, key), NOISE)}
        return sorted(rel for rel, s in now.items() if before.get(rel) != s), now

    def read(self, user: str, key: str, wanted: Sequence[str], max_bytes: int | None = None) -> dict[str, bytes]:
        """Contents for a fetch (``workspace_fetch.read_files``): relpaths, directories and
        globs relative to the workspace, at most ``max_bytes`` (default
        Workspaces.max_fetch_bytes) in all."""
        most = self.max_fetch_bytes if max_bytes is None else max_bytes
        return read_files(self.path(user, key), wanted, most)
