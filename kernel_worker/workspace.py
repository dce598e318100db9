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

Needs only the standard library, traitlets and ``kernel_worker.daemon.paths``; the
file-level rules (relpaths, patterns, ``Tree``) are in ``workspace_tree``, which the
notebook side imports too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import threading
from typing import Mapping, NamedTuple, Sequence

from traitlets import Bool, Int, Unicode, default
from traitlets.config import Configurable

from kernel_worker.backends.docker_owner import handed_dir
from kernel_worker.daemon import paths
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
    land,
    shown,
    write_files,
)


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

    def _check_manifest(
        self, st: dict, manifest: Mapping[str, Sequence], files: Mapping[str, Data], copy: Mapping[str, Stat]
    ) -> list[str]:
        """Refuse a malformed manifest before anything is written, in one pass (it runs
        before every cell). Returns the relpaths whose only change is the executable bit."""
        if len(manifest) > self.max_files:
            raise WorkspaceError(
                f"the manifest lists {len(manifest)} files, over Workspaces.max_files={self.max_files}"
            )
        new, chmods = [], []
        for rel, entry in manifest.items():
            old = st.get(rel)
            if old is None:  # what the state holds was checked when it was written
                check_relpath(rel)
                new.append(rel)
            try:
                size, sha, mode = entry
            except (TypeError, ValueError):
                size = sha = mode = None
            if type(size) is not int or size < 0 or type(mode) is not int:
                raise WorkspaceError(f"manifest entry for {shown(rel)} is not (size, hash, mode)")
            if old is not None and sha == old[1]:
                if rel not in files and (old[2] ^ mode) & 0o111:
                    chmods.append(rel)
                continue
            if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
                raise WorkspaceError(f"manifest entry for {shown(rel)} has no content hash")
            if rel not in files and rel not in copy:
                raise WorkspaceError(f"no contents sent for {shown(rel)}, which the workspace lacks")
        # A file and a directory of one name cannot both be: only a new name can collide
        # (the state mirrors a real tree), so only then is every name's parent listed.
        both = new and {rel[:i] for rel in manifest for i, c in enumerate(rel) if c == "/"} & manifest.keys()
        if both:
            raise BadPath(f"{shown(min(both))} is listed both as a file and as a directory")
        for rel, data in files.items():
            entry = manifest.get(rel)
            if entry is None:
                raise WorkspaceError(f"{shown(rel)} was sent but is not in the manifest")
            if memoryview(data).nbytes != entry[0]:
                raise WorkspaceError(
                    f"{shown(rel)}: {memoryview(data).nbytes} bytes sent, the manifest says {entry[0]}"
                )
        for rel, want in copy.items():
            entry = manifest.get(rel)
            if entry is None or len(want) != 4 or want[0] != entry[0]:
                raise WorkspaceError(f"{shown(rel)} is to be copied but its size is not the manifest's")
        return chmods

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
            chmods = self._check_manifest(st, manifest, files, copy)
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
        """Contents for a fetch: each item of ``wanted`` is a relpath (a directory brings
        everything in it) or a glob relative to the workspace (``*.png`` at the top,
        ``**/*.csv`` anywhere, ``out/**``). Refuses a missing name, a pattern that matches
        nothing, and more than ``max_bytes`` (default Workspaces.max_fetch_bytes) in all."""
        most = left = self.max_fetch_bytes if max_bytes is None else max_bytes
        tree = self.path(user, key)
        names: list[str] = []
        listing: list[str] = []
        with Tree(tree) as t:
            for item in wanted:
                glob = isinstance(item, str) and any(c in item for c in "*?[")
                item = item.rstrip("/") or "/" if isinstance(item, str) else item
                check_relpath(re.sub(r"[*?\[\]]", "x", item) if glob else item)
                if not glob:
                    try:
                        if not stat.S_ISDIR(t.lstat(item).st_mode):
                            names.append(item)
                            continue
                    except FileNotFoundError:
                        raise WorkspaceError(f"the workspace has no file {shown(item)}") from None
                listing = listing or sorted(rel for rel, _ in _walk(tree))
                match = re.compile(glob_regex(item) if glob else re.escape(item) + "/.*").fullmatch
                hits = [r for r in listing if match(r)]
                if not hits:
                    raise WorkspaceError(f"no file in the workspace matches {shown(item)}")
                names += hits
            out: dict[str, bytes] = {}
            for rel in dict.fromkeys(names):
                try:
                    out[rel] = data = t.read(rel, left)
                except FileNotFoundError:
                    raise WorkspaceError(f"the workspace has no file {shown(rel)}") from None
                left -= len(data)
                if left < 0:
                    raise WorkspaceError(
                        f"fetch refused: {len(out)} file(s) up to {shown(rel)} come to more than {human(most)} "
                        "(Workspaces.max_fetch_bytes); fetch fewer files"
                    )
        return out
