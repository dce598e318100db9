"""The notebook's workspace on a node that cannot see the daemon's files (a Slurm compute
node without a shared filesystem): a local mirror, brought up to date before each cell
and sent back after it, over the worker's own socket.

Before a cell whose request says ``mirror``, the worker asks (MIRROR ``have``: relpath ->
content token it holds) and the daemon answers with the workspace's whole listing
(relpath -> [size, token, mode]) and, as frames, exactly the files whose token differs;
the worker writes those and removes what the listing no longer has. After the cell, what
it created, changed or removed in the mirror goes back (MIRROR ``back`` / ``gone``, the
contents as frames) ahead of the cell's reply, so ``%gpu fetch``, ``--fetch`` and the
cost line's count see it as on one host. Tokens are the daemon's content hashes
(xxh3-128); a worker without xxhash leaves a file it wrote without one, and gets it once
more. Standard library only, but xxhash when present.
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

from kernel_worker import protocol as P
from kernel_worker.workspace_tree import NOISE, Tree, _key, _walk, check_relpath

ANSWER_S = 300.0  # how long a cell waits for its workspace (a large first copy)
POLL_S = 0.1
ASK_AGAIN_S = 10.0
MOST_BACK_BYTES = 2 * 1024**3  # what one cell's files send back at most; the rest stays on the worker, named
FILES_BACK = 1000  # files one cell sends back at most (a message's frames are bounded)

try:
    from xxhash import xxh3_128_hexdigest as token_of
except ImportError:  # the cluster's Python may lack it: files the cell wrote come back once more
    token_of = None


class Mirror:
    def __init__(self, channel: Any):
        self.channel = channel
        self.root = ""
        self.held: dict[str, tuple[str, tuple]] = {}  # relpath -> (token, local lstat key)

    def before(self, cell: P.Message) -> str:
        """Bring the mirror up to date for ``cell``; the directory the cell works in."""
        if not self.root:
            self.root = tempfile.mkdtemp(prefix="jupyter-gpu-workspace-")
        while True:  # the daemon sends a bounded batch at a time, and says when more is due
            answer = self._ask(cell)
            if answer is None or not isinstance(answer.content.get("files"), dict):
                why = (answer.content.get("error") if answer is not None else None) or "no answer"
                print(f"jupyter-gpu executor: no workspace from the daemon ({why})", file=sys.__stderr__)
                return self.root
            self._apply(answer.content["files"], answer.content.get("send") or [], answer.buffers)
            if not answer.content.get("more"):
                return self.root

    def _ask(self, cell: P.Message) -> P.Message | None:
        """The daemon's answer, asking again every ASK_AGAIN_S (a daemon restarted meanwhile
        never saw the question; a second answer to the same question is dropped)."""
        question = cell.reply(P.Msg.MIRROR, {"have": {rel: tok for rel, (tok, _) in self.held.items() if tok}})
        polls_per_ask = int(ASK_AGAIN_S / POLL_S)
        for i in range(int(ANSWER_S / POLL_S)):  # short waits: the cell's interrupt ends it, as for input()
            if i % polls_per_ask == 0:
                with self.channel.lock:
                    self.channel.send(question)
            answer = self.channel.answer_to(question, POLL_S, P.Msg.MIRROR)
            if answer is not None:
                return answer
        return None

    def _apply(self, listing: dict, send: list, frames: list) -> None:
        with Tree(self.root) as tree:
            for rel, data in zip(send, frames):
                rel = check_relpath(rel)
                _size, token, mode = listing[rel]
                self.held[rel] = (token, _key(tree.write(rel, data, int(mode))))
            for rel in [r for r in self.held if r not in listing]:
                try:
                    tree.unlink(rel)
                except OSError:
                    pass
                del self.held[rel]

    def after(self, cell: P.Message) -> P.Message | None:
        """What the cell created, changed or removed in the mirror, as a MIRROR ``back``
        message to send before its reply (None when it touched nothing)."""
        if not self.root:
            return None
        now = {rel: st for rel, st in _walk(self.root, NOISE)}
        changed = sorted(rel for rel, st in now.items() if self.held.get(rel, ("", None))[1] != _key(st))
        gone = sorted(rel for rel in self.held if rel not in now)
        if not changed and not gone:
            return None
        back, frames, left, room = {}, [], [], MOST_BACK_BYTES
        with Tree(self.root) as tree:
            for rel in changed:
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
                self.held[rel] = (token_of(data) if token_of else "", _key(now[rel]))
        for rel in gone:
            del self.held[rel]
        return cell.reply(P.Msg.MIRROR, {"back": back, "gone": gone, "left": left}, frames)
