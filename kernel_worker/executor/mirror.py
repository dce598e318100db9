"""Copies of the daemon's trees on a node that cannot see the daemon's files (a Slurm
compute node without a shared filesystem), brought up to date before each cell over the
worker's own socket: the notebook's workspace (the cell's cwd; what the cell creates,
changes or removes there goes back after it) and the user's ``%gpu pip install`` packages
(on ``sys.path``; read-only: never sent back).

Before a cell whose request says ``mirror`` (``{"workspace": bool, "packages": bool}``;
``True``: the workspace alone), the worker asks, tree by tree (MIRROR, see
``kernel_worker/daemon/mirror.py`` for the wire), with the content tokens it holds; the
daemon answers with the tree's whole listing and, as frames, exactly the files whose token
differs, in batches; the worker writes those and removes what the listing no longer has.
The packages copy is the daemon's tree exactly: before asking, the worker checks it (one
``lstat`` a file), puts back what a cell changed there, removes what a cell added, and,
when nothing was touched, names only the digest of the listing it holds, so unchanged
packages cost one comparison on the daemon. A package installed mid-session is importable
in the next cell (``importlib.invalidate_caches``); one already imported keeps its old
version until ``%gpu release``, as everywhere.

After the cell, what it created, changed or removed in the workspace goes back (MIRROR
``back`` / ``gone``, the contents as frames) ahead of the cell's reply, so ``%gpu fetch``,
``--fetch`` and the cost line's count see it as on one host. Tokens are the daemon's content
hashes (xxh3-128); a worker without xxhash leaves a file it wrote without one, and gets it
once more. Standard library only, but xxhash when present.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import uuid
from typing import Any

from kernel_worker import protocol as P
from kernel_worker.workspace_tree import NOISE, PACKAGES, WORKSPACE, Tree, _key, _walk, check_relpath

ANSWER_S = 300.0  # how long a cell waits for one answer (a large first copy)
POLL_S = 0.1
ASK_AGAIN_S = 10.0
MOST_BACK_BYTES = 2 * 1024**3  # what one cell's files send back at most; the rest stays on the worker, named
FILES_BACK = 1000  # files one cell sends back at most (a message's frames are bounded)
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"  # whose packages this worker can import
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # first on PYTHONPATH

try:
    from xxhash import xxh3_128_hexdigest as token_of
except ImportError:  # the cluster's Python may lack it: files the cell wrote come back once more
    token_of = None


class Copy:
    """One tree's copy on this node."""

    def __init__(self, tree: str, exact: bool) -> None:
        self.tree = tree
        self.exact = exact  # the daemon's tree and nothing else (packages); else a cell's files stay
        self.root = ""
        self.held: dict[str, tuple[str, tuple]] = {}  # relpath -> (token, local lstat key)
        self.digest = ""  # the listing an exact copy holds, all of it


def _trees(wanted: Any) -> set[str]:
    if wanted is True:  # a daemon that mirrors the workspace only
        return {WORKSPACE}
    return {t for t in (WORKSPACE, PACKAGES) if isinstance(wanted, dict) and wanted.get(t) is True}


class Mirror:
    def __init__(self, channel: Any):
        self.channel = channel
        self.workspace = Copy(WORKSPACE, exact=False)
        self.packages = Copy(PACKAGES, exact=True)
        # The last cell's write-back, by name: sent again, read afresh, after a reconnect
        # (a daemon killed before it wrote the files); (cell, message id, names, gone, left).
        self.sent_back: tuple[P.Message, str, list, list, list] | None = None
        channel.on_connect = self.back_again

    @property
    def root(self) -> str:
        """The workspace's copy ('' until a cell ran in one)."""
        return self.workspace.root

    def before(self, cell: P.Message) -> str:
        """Bring the copies ``cell`` asks for up to date; the directory the cell works in
        ('' when it has no workspace: it stays where it is)."""
        trees = _trees(cell.content.get("mirror"))
        if PACKAGES in trees:
            self._packages(cell)
        if WORKSPACE not in trees:
            return ""
        self._bring(cell, self.workspace)
        return self.workspace.root

    def _packages(self, cell: P.Message) -> None:
        copy = self.packages
        changed = self._bring(cell, copy)
        if copy.held and copy.root not in sys.path:
            sys.path.insert(_path_index(), copy.root)
            changed = True
        if changed:  # a package installed since the last cell: the import system looks again
            importlib.invalidate_caches()

    def _bring(self, cell: P.Message, copy: Copy) -> bool:
        """Ask the daemon for ``copy``'s tree until it is up to date; whether a file changed.
        A failure (the daemon's reason, a full disk here) is said, and the cell runs."""
        changed = False
        if not copy.root:  # removed with the worker's scratch directory when it ends
            copy.root = os.path.join(self.channel.scratch(), copy.tree)
            os.makedirs(copy.root, 0o700, exist_ok=True)
        try:
            changed, listed = self._check(copy) if copy.exact else (False, "")
            while True:  # the daemon sends a bounded batch at a time, and says when more is due
                answer = self._ask(cell, copy, listed)
                content = answer.content if answer is not None else {"error": "no answer"}
                if content.get("same"):
                    return changed
                if content.get("stale"):  # changed since: say what is held, file by file
                    listed = ""
                    continue
                try:
                    listing = json.loads(bytes(answer.buffers[0])) if "error" not in content else None
                except (IndexError, ValueError, TypeError):
                    listing = None
                if not isinstance(listing, dict):
                    self._say(copy, str(content.get("error") or "a malformed answer"))
                    return changed
                changed |= self._apply(copy, listing, content.get("send") or [], answer.buffers[1:])
                if not content.get("more"):
                    whole = all(copy.held.get(rel, ("",))[0] == entry[1] for rel, entry in listing.items())
                    copy.digest = str(content.get("digest") or "") if copy.exact and whole else ""
                    return changed
        except (OSError, ValueError, TypeError, KeyError) as e:  # a full disk on this node, a bad answer
            copy.digest = ""
            self._say(copy, f"{type(e).__name__}: {e}")
            return True

    def _say(self, copy: Copy, why: str) -> None:
        """The daemon's reason, in the worker's log and in the cell's output."""
        print(f"jupyter-gpu executor: no {copy.tree} from the daemon ({why})", file=sys.__stderr__)
        what = "your `%gpu pip install` packages" if copy.tree == PACKAGES else "the notebook's workspace"
        sys.stderr.write(f"jupyter-gpu: {what} could not be brought to this worker: {why}\n")

    def _check(self, copy: Copy) -> tuple[bool, str]:
        """Make an exact copy hold only what the daemon sent, as it sent it: a file a cell
        added is removed, one it changed or removed is asked for again. Returns whether a
        file was removed, and the digest to name when nothing was touched ('' else)."""
        now = {rel: _key(st) for rel, st in _walk(copy.root, NOISE)}
        touched = [rel for rel, (_token, key) in copy.held.items() if now.get(rel) != key]
        for rel in touched:
            del copy.held[rel]
        extra = [rel for rel in now if rel not in copy.held]
        if extra:
            with Tree(copy.root) as tree:
                for rel in extra:
                    try:
                        tree.unlink(rel)
                    except OSError:
                        pass
        return bool(extra), "" if touched or extra else copy.digest

    def _ask(self, cell: P.Message, copy: Copy, listed: str) -> P.Message | None:
        """The daemon's answer, asking again every ASK_AGAIN_S (a daemon restarted meanwhile
        never saw the question; a second answer to the same question is dropped)."""
        content: dict = {"tree": copy.tree, "python": PYTHON}
        frames = []
        if listed:
            content["listed"] = listed
        else:
            frames = [json.dumps({rel: tok for rel, (tok, _) in copy.held.items() if tok}).encode()]
        question = cell.reply(P.Msg.MIRROR, content, frames)
        polls_per_ask, asked, connects = int(ASK_AGAIN_S / POLL_S), 0, -1
        for i in range(int(ANSWER_S / POLL_S)):  # short waits: the cell's interrupt ends it, as for input()
            if i % polls_per_ask == 0 or connects != self.channel.connects:  # a daemon back after a restart: at once
                connects = self.channel.connects
                asked += 1
                question.content["ask"] = asked  # the same question, not a replay the daemon would refuse
                with self.channel.lock:
                    self.channel.send(question)
            answer = self.channel.answer_to(question, POLL_S, P.Msg.MIRROR)
            if answer is not None:
                return answer
        return None

    def _apply(self, copy: Copy, listing: dict, send: list, frames: list) -> bool:
        changed = False
        with Tree(copy.root) as tree:
            for rel, data in zip(send, frames):
                rel = check_relpath(rel)
                _size, token, mode = listing[rel]
                copy.held[rel] = (token, _key(tree.write(rel, data, int(mode))))
                changed = True
            for rel in [r for r in copy.held if r not in listing]:
                try:
                    tree.unlink(rel)
                except OSError:
                    pass
                del copy.held[rel]
                changed = True
        return changed

    def after(self, cell: P.Message) -> P.Message | None:
        """What the cell created, changed or removed in the workspace's copy, as a MIRROR
        ``back`` message to send before its reply (None when it touched nothing). The
        packages' copy never goes back."""
        held, root = self.workspace.held, self.workspace.root
        if not root or WORKSPACE not in _trees(cell.content.get("mirror")):
            return None
        self.sent_back = None
        now = {rel: st for rel, st in _walk(root, NOISE)}
        changed = sorted(rel for rel, st in now.items() if held.get(rel, ("", None))[1] != _key(st))
        gone = sorted(rel for rel in held if rel not in now)
        if not changed and not gone:
            return None
        msg = self._back(cell, uuid.uuid4().hex, changed, gone, [], now)
        for rel in gone:
            del held[rel]
        return msg

    def _back(self, cell: P.Message, mid: str, names: list, gone: list, left: list, now: dict) -> P.Message:
        """A MIRROR ``back`` of ``cell`` with id ``mid``: the files ``names`` as they are now
        (``now``: their lstat), and ``gone``; remembered, to be sent again after a reconnect."""
        held = self.workspace.held
        back, frames, left, room = {}, [], list(left), MOST_BACK_BYTES
        with Tree(self.workspace.root) as tree:
            for rel in names:
                if rel not in now:
                    continue
                if now[rel].st_size > room or len(back) >= FILES_BACK:
                    left.append(rel)
                    continue
                try:
                    data = tree.read(rel, now[rel].st_size)
                except (OSError, ValueError):  # gone, or no longer a regular file
                    continue
                room -= len(data)
                back[rel] = [len(data), 0o700 if now[rel].st_mode & 0o111 else 0o600]
                frames.append(data)
                held[rel] = (token_of(data) if token_of else "", _key(now[rel]))
        self.sent_back = (cell, mid, sorted(back), gone, left)
        content = {"tree": WORKSPACE, "back": back, "gone": gone, "left": left}
        return P.Message(P.Msg.MIRROR, content, cell.session, id=mid, parent=cell.id, buffers=frames)

    def back_again(self) -> P.Message | None:
        """Channel, on a (re)connect: the last cell's write-back once more, read afresh
        (the daemon that had it may have died before writing it; one that did drops a
        second copy), while that cell is still the last one."""
        if self.sent_back is None:
            return None
        cell, mid, names, gone, left = self.sent_back
        if cell.id != self.channel.journal.request:  # a later cell began
            self.sent_back = None
            return None
        now = {rel: st for rel, st in _walk(self.workspace.root, NOISE)}
        return self._back(cell, mid, names, gone, left, now)


def _path_index() -> int:
    """Where the packages go on ``sys.path``: where PYTHONPATH would have put them (after
    this package's own directory, ahead of the Python's site-packages)."""
    for i, entry in enumerate(sys.path):
        if entry and os.path.abspath(entry) == CODE_ROOT:
            return i + 1
    for i, entry in enumerate(sys.path):
        if entry.endswith(("site-packages", "dist-packages")):
            return i
    return len(sys.path)
