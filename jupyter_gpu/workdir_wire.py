"""The notebook's side of the workspace wire (``kernel_worker.daemon.workdirs`` has the
daemon's, and the message layouts): push the notebook's directory before a cell, fetch
files back after it, and the words for the cost line.

An unchanged tree costs a scan (one ``lstat`` per file, hashes from the stat cache) and
no message at all: the last manifest synced to each daemon and workspace is kept, and a
scan equal to it skips the exchange. Otherwise one SYNC names the manifest; the daemon
answers with what it lacks; a second SYNC carries only those files. On the daemon's own
host (``local``: the notebook reads the daemon's bulk directory) the second SYNC names the
notebook's directory and each lacking file's stat instead, and the daemon copies them in
the kernel; what changed since it was hashed is sent as bytes in a third.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable

from jupyter_gpu.commands import GPUCellError
from jupyter_gpu.workdir import WorkdirSync, notebook_key
from kernel_worker import protocol as P

Request = Callable[[P.Message], P.Message]


class WorkdirWire:
    """One per kernel: its stat cache (in ``sync``) and what it last synced where."""

    def __init__(self, sync: WorkdirSync) -> None:
        self.sync = sync
        self.last: dict[tuple, dict] = {}  # (daemon url, session, key) -> manifest entries synced there
        self.stats = {"scans": 0, "requests": 0, "files": 0, "bytes": 0, "copied": 0}

    def push(self, request: Request, where: tuple, session: str, key: str, root: str, local: bool = False) -> str:
        """Make the workspace ``key`` hold ``root``; what was left out and why ('' if nothing,
        and '' when nothing had to be exchanged: it was said when it was). ``local``: the
        daemon shares this host, so it may copy the files itself."""
        m = self.sync.scan(root, keep=not local)
        self.stats["scans"] += 1
        tag = (*where, session, key)
        if self.last.get(tag) == m.entries:
            return ""
        self.last.pop(tag, None)  # until this sync is known to have landed
        reply = self._send(request, session, key, m.entries, {}, {"local": True} if local else None)
        need = reply.content.get("need") or []
        stats = {rel: m.stats[rel] for rel in need if m.stats.get(rel)} if reply.content.get("local") is True else {}
        if stats:  # the daemon copies these from root itself, if still as hashed; names what it could not
            rest = self.sync.contents(m, [rel for rel in need if rel not in stats])  # changed while hashed
            src = {"copy": {"root": m.root, "dev": m.root_id[0], "ino": m.root_id[1]}}
            frame = json.dumps(stats, separators=(",", ":")).encode()
            need = list(self._send(request, session, key, m.entries, rest, src, frame).content.get("need") or [])
            self.stats["files"] += len(stats) - len(need)
            self.stats["copied"] += len(stats) - len(need)
        if need:
            contents = self.sync.contents(m, need)  # may update entries (changed since the scan)
            self._send(request, session, key, m.entries, contents)
        self.last[tag] = dict(m.entries)
        return self.sync.message(m.left_out).removeprefix("jupyter-gpu: ")

    def _send(
        self,
        request: Request,
        session: str,
        key: str,
        entries: dict,
        files: dict,
        extra: dict | None = None,
        *stats: bytes,
    ) -> P.Message:
        manifest = json.dumps(entries, separators=(",", ":")).encode()
        content = {"key": key, "files": list(files), **(extra or {})}
        msg = P.Message(P.Msg.SYNC, content, session, buffers=[manifest, *stats, *files.values()])
        self.stats["requests"] += 1
        self.stats["files"] += len(files)
        self.stats["bytes"] += sum(len(d) for d in files.values())
        return request(msg)

    def fetch(self, request: Request, session: str, key: str, wanted: Iterable[str], root: str) -> list[str]:
        """Bring files (relpaths, directories or globs) from the workspace into ``root``;
        the relpaths written."""
        reply = request(P.Message(P.Msg.FETCH, {"key": key, "paths": list(wanted)}, session))
        names = reply.content.get("files")
        if not isinstance(names, list) or len(names) != len(reply.buffers):
            raise ValueError("the daemon's fetch reply does not match its frames")
        return self.sync.store(root, dict(zip(names, reply.buffers)))


def changed_note(info: Any, fetched: Iterable[str] = ()) -> str:
    """The cost line's words for what a cell created or changed in its workspace."""
    if isinstance(info, dict) and info.get("unmounted"):
        return (
            "this session's worker was started without the notebook's directory (before it was synced, or warm "
            "from the pool), so the cell ran elsewhere: `%gpu release` and run it again to get one with it"
        )
    if not isinstance(info, dict) or not info.get("changed"):
        return ""
    n = int(info["changed"])
    names = [str(x) for x in info.get("names") or []][:5]
    more = f" and {n - len(names)} more" if n > len(names) else ""
    shown = f" ({', '.join(names)}{more})" if names else ""
    got = set(fetched)
    if got and all(x in got for x in names) and n == len(names):
        return f"{n} file{'s' if n != 1 else ''} created or changed in the workspace{shown}, fetched"
    return f"{n} file{'s' if n != 1 else ''} created or changed in the workspace{shown}: `%gpu fetch` brings them back"


def fetched_note(written: list[str], root: str) -> str:
    names = ", ".join(written[:5]) + (f" and {len(written) - 5} more" if len(written) > 5 else "")
    where = os.path.basename(root) or root
    return f"fetched {len(written)} file{'s' if len(written) != 1 else ''} into {where}: {names}"


class WorkspaceCells:
    """``GPUMagics``' part of the sync: whether a cell needs it, the push before it, the
    counts and ``--fetch`` after it, and ``%gpu fetch``."""

    session_id: str
    sync_workdir: bool
    workdir: WorkdirWire
    client: Any
    _request: Any
    _note: Any
    _bulk_dir: Any

    def _backend_of(self, client: Any) -> str:
        """The daemon's backend (one HELLO per client)."""
        cached = getattr(self, "_hello_backend", (None, ""))
        if cached[0] is not client:
            cached = (client, str(client.call(P.Msg.HELLO).get("backend") or ""))
            self._hello_backend = cached
        return cached[1]

    @staticmethod
    def _workspace_key() -> str:
        return notebook_key(os.getcwd())

    def _needs_sync(self, directory: str | None, client: Any) -> bool:
        """Only where the worker cannot work in the notebook's own directory: a daemon on
        another host or as another user (no shared bulk directory), or a container."""
        return directory is None or self._backend_of(client) != "process"

    def _sync_for_cell(self, args: Any, directory: str | None, client: Any = None) -> str | None:
        """Push the notebook's directory when this cell needs it; the workspace key, or None."""
        client = client or self.client
        if getattr(args, "no_sync", False) or not self.sync_workdir or not self._needs_sync(directory, client):
            return None
        key = self._workspace_key()
        root = os.getcwd()
        try:
            request = lambda m: self._request(m, None, client)  # noqa: E731
            local = directory is not None  # the daemon's bulk directory is ours too: the same host
            note = self.workdir.push(request, (client.url,), self.session_id, key, root, local)
        except OSError as e:
            raise GPUCellError(
                f"could not read the notebook's directory {root} to sync it to the worker: {e}. Nothing was run "
                "(%%gpu --no-sync runs without it)"
            ) from None
        except GPUCellError as e:
            raise GPUCellError(
                f"the notebook's directory could not be synced to the worker: {e}. Nothing was run "
                "(%%gpu --no-sync runs without it)"
            ) from None
        if note:
            self._note(note)
        return key

    def _after_sync_cell(self, args: Any, key: str | None, done: dict, client: Any = None) -> None:
        """Fetch what ``--fetch`` names; say what the cell created or changed."""
        if key is None:
            if getattr(args, "fetch", None):
                self._note("--fetch: nothing to fetch, the worker works in this notebook's own directory")
            return
        written: list[str] = []
        if getattr(args, "fetch", None):
            root = os.getcwd()
            try:
                written = self.workdir.fetch(
                    lambda m: self._request(m, None, client), self.session_id, key, args.fetch, root
                )
            except (GPUCellError, ValueError, OSError) as e:
                self._note(f"--fetch failed: {e}")
            else:
                self._note(fetched_note(written, root))
        note = changed_note(done.get("workspace"), written)
        if note:
            self._note(note)

    def _fetch(self, rest: str) -> None:
        """%gpu fetch PATH...: files the cells wrote in the workspace, into this directory."""
        wanted = rest.split()
        if not wanted:
            raise GPUCellError("usage: %gpu fetch PATH [PATH...] (relative to the notebook's directory; globs allowed)")
        directory = self._bulk_dir()
        if not self._needs_sync(directory, self.client):
            print("nothing to fetch: the worker works in this notebook's own directory")
            return
        root = os.getcwd()
        try:
            written = self.workdir.fetch(self._request, self.session_id, self._workspace_key(), wanted, root)
        except (ValueError, OSError) as e:
            raise GPUCellError(f"fetch failed: {e}") from None
        print(fetched_note(written, root))
