"""The worker's side of snapshots: write its namespace when the daemon asks (before an
idle release), and restore one into a fresh worker: small values at once, large ones
when a cell first reads them (a 1 GiB namespace costs a cell that reads one small name
almost nothing).

"Reads" are the names a cell's code loads, plus, for every value restored that is a
function or a class, the global names its code uses (a function that reads a large
global brings it in when the function does)."""

from __future__ import annotations

import ast
import os
import shutil
import tempfile
import types
from typing import Any, Callable

from kernel_worker import filestream, snapshot
from kernel_worker import protocol as P


class Restorer:
    def __init__(
        self, ns: Callable[[], dict], received: dict[str, str], transform: Callable[[str], str] | None, channel: Any
    ):
        self._ns = ns  # the shell's namespace (it is made after this object)
        self.channel = channel  # a node without the daemon's disk gets and sends a snapshot's files over it
        self.received = received  # name -> fingerprint of the value the notebook shipped
        self.transform = transform  # IPython's cell transform (`!cmd`, `%magic`), if the shell has one
        self.pending: dict[str, tuple[str, dict]] = {}  # name -> (snapshot dir, manifest): not loaded yet
        self.failed: dict[str, str] = {}  # names that could not be restored, with why

    # ------------------------------------------------------------------ write

    def take(self, msg: P.Message) -> P.Message:
        """Write the namespace where the daemon says, or (``send``: this node cannot see the
        daemon's disk) on this node, and send its files ahead of the reply."""
        send = msg.content.get("send") is True
        path = tempfile.mkdtemp(prefix="snapshot-", dir=self.channel.scratch()) if send else msg.content.get("dir")
        if not isinstance(path, str) or not os.path.isabs(path) or not os.path.isdir(path):
            return msg.reply(P.Msg.REPLY, {"ok": False, "error": "the snapshot directory is missing"})
        self.load(list(self.pending))  # names still on disk go into the new snapshot too
        ns = self._ns()
        items = {k: v for k, v in ns.items() if not k.startswith("_") and k not in SHELL_NAMES}
        prints = {k: self.received[k] for k in items if k in self.received}
        try:
            manifest = snapshot.write(items, path, prints, sync=not send)  # sent: the daemon syncs its copy
            if send:
                pieces, files = filestream.pieces(path, msg.id, msg.session)
        except Exception as e:  # noqa: BLE001 -- the daemon logs it and releases anyway
            return msg.reply(P.Msg.REPLY, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            if send:
                shutil.rmtree(path, ignore_errors=True)  # the pieces map the files: they outlive their names
        names = sorted(manifest.get("names", {}))
        content = {"ok": True, "names": names, "bytes": manifest.get("bytes", 0), "left": manifest.get("left", {})}
        if send:
            with self.channel.lock:
                if not self.channel.push(pieces):
                    return msg.reply(P.Msg.REPLY, {"ok": False, "error": "the daemon stopped taking its files"})
            content["files"] = files
        return msg.reply(P.Msg.REPLY, content)

    # ------------------------------------------------------------------ restore

    def restore(self, msg: P.Message) -> P.Message:
        path, lazy = msg.content.get("dir"), msg.content.get("lazy_bytes")
        lazy = lazy if isinstance(lazy, int) and lazy >= 0 else 0
        try:
            if "files" in msg.content:  # sent ahead of this request, into this node's own directory
                path = self._received(msg)
            if not isinstance(path, str) or not os.path.isabs(path):
                return msg.reply(P.Msg.REPLY, {"ok": False, "error": "no snapshot directory"})
            manifest = snapshot.read_manifest(path)
        except (snapshot.SnapshotError, filestream.FileStreamError) as e:
            return msg.reply(P.Msg.REPLY, {"ok": False, "error": str(e)})
        entries: dict = manifest.get("names", {})
        for name, entry in entries.items():
            self.pending[name] = (path, manifest)
            fp = entry.get("fingerprint") if isinstance(entry, dict) else None
            if fp:
                self.received[name] = fp  # the value the notebook shipped, as it shipped it
        eager = [n for n, e in entries.items() if not isinstance(e, dict) or int(e.get("bytes", 0)) <= lazy]
        self.load(eager)
        content = {
            "ok": True,
            "names": sorted(entries),
            "bytes": manifest.get("bytes", 0),
            "lazy": sorted(self.pending),
            "failed": dict(self.failed),
        }
        return msg.reply(P.Msg.REPLY, content)

    def _received(self, msg: P.Message) -> str:
        """The directory the files ``msg`` names arrived in, all of them whole."""
        got, self.channel.incoming = self.channel.incoming, None
        if got is None or got.of != msg.id:
            raise filestream.FileStreamError("the snapshot's files did not reach this worker")
        if self.channel.incoming_error:
            got.close()
            raise filestream.FileStreamError(
                f"the snapshot's files could not be written on this node: {self.channel.incoming_error}"
            )
        got.finish(msg.content["files"], sync=False)
        return got.directory

    def before_cell(self, code: str, assumed: Any) -> None:
        """Load what the cell reads (and what the notebook assumes held) that is still on disk."""
        if not self.pending:
            return
        wanted = set(assumed) if isinstance(assumed, dict) else set()
        wanted |= self.reads(code)
        self.load(sorted(wanted & self.pending.keys()))

    def reads(self, code: str) -> set[str]:
        """The global names ``code`` loads; everything pending where it cannot be parsed."""
        for text in (code, self._transformed(code)):
            try:
                tree = ast.parse(text)
            except (SyntaxError, ValueError):
                continue
            return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
                a.id for n in ast.walk(tree) if isinstance(n, ast.Global) for a in n.names
            }
        return set(self.pending)

    def _transformed(self, code: str) -> str:
        try:
            return self.transform(code) if self.transform else code
        except Exception:  # noqa: BLE001 -- then every pending name is loaded
            return "\0"

    def load(self, names: list[str]) -> None:
        """Load ``names`` from their snapshots, and what the functions among them read."""
        todo = [n for n in names if n in self.pending]
        while todo:
            by_dir: dict[str, list[str]] = {}
            for n in todo:
                by_dir.setdefault(self.pending[n][0], []).append(n)
            found: dict[str, Any] = {}
            for path, group in by_dir.items():
                values, failed = snapshot.load(path, self.pending[group[0]][1], group)
                found.update(values)
                self.failed.update(failed)
            for n in todo:
                self.pending.pop(n, None)
            ns = self._ns()
            ns.update({name: _rebound(value, ns) for name, value in found.items()})
            for n in [n for n in self.pending if n in ns]:  # came in with a function that reads it
                del self.pending[n]
            todo = sorted({g for v in found.values() for g in _globals_used(v)} & self.pending.keys())


SHELL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


def _globals_used(value: Any) -> set[str]:
    """Global names a function's (or a class's methods') code reads, nested code included."""
    codes = []
    if isinstance(value, types.FunctionType):
        codes.append(value.__code__)
    elif isinstance(value, type):
        codes += [f.__code__ for f in vars(value).values() if isinstance(f, types.FunctionType)]
    names: set[str] = set()
    while codes:
        c = codes.pop()
        names.update(c.co_names)
        codes += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return names


def _rebound(value: Any, ns: dict) -> Any:
    """A function (or a class's methods) defined in the notebook reads its globals from
    the namespace, as it did before the snapshot: ``offset = 10`` after the restore is
    seen by ``model.predict``. Unpickled, their globals are a dict of their own."""
    if isinstance(value, types.FunctionType) and value.__module__ == "__main__" and value.__globals__ is not ns:
        fresh = types.FunctionType(value.__code__, ns, value.__name__, value.__defaults__, value.__closure__)
        fresh.__dict__.update(value.__dict__)
        fresh.__kwdefaults__, fresh.__qualname__ = value.__kwdefaults__, value.__qualname__
        fresh.__annotations__, fresh.__doc__ = value.__annotations__, value.__doc__
        for name, global_value in value.__globals__.items():
            if not name.startswith("__"):
                ns.setdefault(name, global_value)  # what it read, if the namespace lacks it
        return fresh
    if isinstance(value, type) and value.__module__ == "__main__":
        for name, attr in list(vars(value).items()):
            if isinstance(attr, types.FunctionType):
                setattr(value, name, _rebound(attr, ns))
    return value
