"""Which local names a cell needs, and whether the worker already has them.

A cell ships the names it reads (found by walking its AST in source order) that
exist in the notebook's namespace and are either not on the worker or changed
locally since they were last shipped. "Changed" is decided by a content hash
(xxh3-128 of the pickle payload and its out-of-band buffers): an unchanged 256 MB
array costs a hash, about 10 ms, not a transfer.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Callable

import xxhash

from kernel_worker import protocol as P
from kernel_worker import serialize

# IPython's own bookkeeping names never travel.
_SKIP = {"In", "Out", "get_ipython", "exit", "quit", "_", "__", "___", "_oh", "_dh", "_ih", "_ii", "_iii"}


class _Reads(ast.NodeVisitor):
    """Names loaded before the cell itself binds them (module level, in source order)."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.bound: set[str] = set()

    def _load(self, name: str) -> None:
        if name not in self.bound and name not in self.reads:
            self.reads.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._load(node.id)
        else:
            self.bound.add(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for t in node.targets:
            self.visit(t)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)
        self.visit(node.value)
        self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def _def(self, node: Any) -> None:
        # Decorators and defaults run now; the body reads globals later (conservatively: now).
        for d in getattr(node, "decorator_list", []):
            self.visit(d)
        for child in ast.iter_child_nodes(node):
            if child not in getattr(node, "decorator_list", []):
                self.visit(child)
        self.bound.add(node.name)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _def

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.bound.add(a.asname or a.name.split(".")[0])

    visit_ImportFrom = visit_Import


def names_read(source: str, transform: Callable[[str], str] | None = None) -> list[str]:
    """Names ``source`` reads before binding them. Cells using IPython syntax (``!ls``,
    ``%time``) are first made Python by ``transform``; a cell that still does not parse
    reads nothing, so the worker reports the syntax error with its own traceback."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        try:
            tree = ast.parse(transform(source) if transform else source)
        except SyntaxError:
            return []
    v = _Reads()
    v.visit(tree)
    return [n for n in v.reads if n not in _SKIP and not (n.startswith("_i") and n[2:].isdigit())]


def fingerprint(frames: list) -> bytes:
    h = xxhash.xxh3_128()
    for f in frames:
        h.update(memoryview(f).cast("B") if not isinstance(f, bytes) else f)
        h.update(b"\0")
    return h.digest()


@dataclass
class RemoteNamespace:
    """What this notebook knows of its worker's namespace."""

    remote: set[str] = field(default_factory=set)  # names that exist on the worker
    shipped: dict[str, bytes] = field(default_factory=dict)  # name -> fingerprint of the local value shipped
    made: set[str] = field(default_factory=set)  # remote names whose value the worker made (not shipped)
    gone: set[str] = field(default_factory=set)  # names a worker made that went with it

    def reset(self) -> None:
        """A fresh worker: nothing is there any more."""
        self.gone |= self.made
        self.remote.clear()
        self.shipped.clear()
        self.made.clear()

    def restored(self, names: list[str]) -> None:
        """A new worker started from a snapshot: it holds ``names`` again, as its own."""
        self.remote.update(names)
        self.made.update(names)
        self.gone.difference_update(names)

    def lost(self, names: list[str], user_ns: dict) -> list[str]:
        """Names a cell reads that existed only on a worker that is gone."""
        return [n for n in names if n in self.gone and n not in user_ns and n not in self.remote]

    def to_ship(self, names: list[str], user_ns: dict, force: bool = False) -> tuple[list[dict], list, dict, dict]:
        """Serialise what must travel, and name what the worker is assumed to hold already
        (with the fingerprint shipped, or ``WORKER_MADE``), so that the worker, which knows,
        can ask for what it lacks. Raises ``serialize.SerializationError`` naming the first
        variable that cannot travel, before anything is sent."""
        specs, frames, prints, assumed = [], [], {}, {}
        for name in names:
            if name not in user_ns:
                if name in self.remote:  # the worker's own, with no local value to send
                    assumed[name] = P.WORKER_MADE
                continue
            value = user_ns[name]
            try:
                parts = serialize.dumps(value)
            except Exception as e:
                raise serialize.SerializationError(name, value, e) from None
            fp = fingerprint(parts)
            if not force and name in self.remote and self.shipped.get(name) == fp:
                assumed[name] = P.WORKER_MADE if name in self.made else fp.hex()
                continue
            specs.append({"name": name, "nframes": len(parts), "fp": fp.hex()})
            frames.extend(parts)
            prints[name] = fp
        return specs, frames, prints, assumed

    def shipped_ok(self, prints: dict[str, bytes]) -> None:
        self.shipped.update(prints)
        self.remote.update(prints)
        self.made.difference_update(prints)

    def lacking(self, names: list[str], user_ns: dict) -> tuple[list[str], list[str]]:
        """The worker lacks ``names`` (it was replaced, released, restarted...): forget
        them, so the next ``to_ship`` sends the notebook's values. Returns the names only
        the worker ever had (lost), and those whose worker-made value is replaced by the
        notebook's own."""
        lost = [n for n in names if n not in user_ns]
        replaced = [n for n in names if n in user_ns and n in self.made]
        for n in names:
            self.remote.discard(n)
            self.shipped.pop(n, None)
            self.made.discard(n)
        self.gone.update(lost)
        return lost, replaced

    def after_cell(self, bound: list[str], deleted: list[str], user_ns: dict) -> None:
        """The worker (re)bound ``bound``: its values win over the local ones of the same
        name until those change locally, so remember what the local ones look like now."""
        for n in bound:
            self._remember(n, user_ns)
        for n in deleted:
            self.remote.discard(n)
            self.shipped.pop(n, None)
            self.made.discard(n)

    def _remember(self, name: str, user_ns: dict) -> None:
        self.remote.add(name)
        self.made.add(name)
        self.gone.discard(name)
        self.shipped.pop(name, None)
        if name in user_ns:
            try:
                self.shipped[name] = fingerprint(serialize.dumps(user_ns[name]))
            except Exception:
                pass  # unpicklable locally: it can only be shipped by changing it

    def pulled(self, name: str, user_ns: dict) -> None:
        """A value just pulled is equal on both sides: no need to send it back."""
        self._remember(name, user_ns)
