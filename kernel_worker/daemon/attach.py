"""Who follows a session's output, and whether anyone still does; and output that comes
after its cell returned.

A notebook follows its session through its requests. When the connection breaks (the
daemon restarted, a tunnel dropped) the notebook's next ping names the request it waits
for and the number of the last output it saw: the daemon answers whether that request
will still be answered and sends what was missed. A kernel that goes away stops its
keepalive pings; its session is then *detached*: a running cell keeps running, its
output is kept, and after ``orphan_grace`` with no cell running the session is released.
Another kernel of the same user may ATTACH: it gets the running (or last) cell's output
so far, then the rest live, and the worker's variables are its own from then on.

Output a cell's threads write after the cell returned (a DataLoader worker, a logging
handler) is not dropped: it goes into the running cell at once, or to the start of the
next cell of the session, after a note saying it came late.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Awaitable

from kernel_worker import protocol as P
from kernel_worker.journal import SEQ, Journal
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

TAKEN_OVER = "another kernel took this session over (`%gpu attach`)"
LATE_KINDS = frozenset({P.Msg.STREAM, P.Msg.DISPLAY, P.Msg.UPDATE_DISPLAY, P.Msg.CLEAR})
LATE_MOST = 1000  # outputs written after their cell returned, kept for the next cell


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Attach:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log

    # ------------------------------------------------------------------ a cell's output

    def journal(self, s: Session) -> Journal:
        if s.log is None:
            s.log = Journal(self.d.output_memory_bytes, self.d.output_disk_bytes, self.d.workers.session_dir(s.wid))
        return s.log

    def keep(self, s: Session, msg: P.Message) -> bool:
        """Journal a worker's output; False for a number already here (sent again after a
        reconnect), which is dropped."""
        seq = msg.content.get(SEQ)
        log = s.log
        if log is None or log.request != msg.parent or not isinstance(seq, int):
            return True
        if seq <= log.last_seq:
            return False
        log.add(seq, msg)
        return True

    def relay(self, s: Session, msg: P.Message) -> None:
        """To whoever follows ``s`` now: the notebook that sent the request, or the kernel
        that attached (its ATTACH is the request its output answers)."""
        if not s.client:
            return  # nobody, for now: it is journaled
        if s.answer is not None and msg.parent != s.answer.id:
            msg = dataclasses.replace(msg, parent=s.answer.id)
        self.d.front.send(s.client, msg)

    def _replay(self, s: Session, ident: bytes, after: int, answer: P.Message | None) -> None:
        for m in self.journal(s).since(after):
            self.d.front.send(ident, m if answer is None else dataclasses.replace(m, parent=answer.id))

    # ------------------------------------------------------------------ late output

    def late(self, s: Session, msg: P.Message) -> None:
        """Output of a cell that already returned (a thread, a DataLoader worker, a logging
        handler): into the running cell at once, else at the start of the next one."""
        if not self.keep(s, msg):
            return
        late = dataclasses.replace(msg, content={k: v for k, v in msg.content.items() if k != SEQ})
        if len(s.late) < LATE_MOST:
            s.late.append(late)
        if s.state == "busy" and s.current is not None and s.current.type == P.Msg.EXECUTE:
            self.deliver_late(s, s.current)

    def deliver_late(self, s: Session, cell: P.Message) -> None:
        late, s.late = s.late, []
        n = len(late)
        more = f"; more were dropped, at most {LATE_MOST} are kept" if n == LATE_MOST else ""
        note = f"[jupyter-gpu] written after the previous cell returned ({n} output{'s' if n != 1 else ''}{more}):\n"
        self.relay(s, cell.reply(P.Msg.STREAM, {"name": "stderr", "text": note}))
        for m in late:
            self.relay(s, dataclasses.replace(m, parent=cell.id))

    # ------------------------------------------------------------------ pings

    def ping(self, ident: bytes, msg: P.Message, user: str) -> None:
        """PONG, with this daemon's incarnation; for a ping naming a request, whether that
        request is still coming (after sending what the notebook missed of it)."""
        content: dict = {"incarnation": self.d.incarnation}
        rid = msg.content.get("request")
        live = self.d.sessions.live
        # An ATTACH's ping names the attaching kernel's own session; its request is the answer.
        s = next((o for o in live.values() if o.answer is not None and o.answer.id == rid), None) if rid else None
        s = s or live.get(msg.session)
        mine = s is not None and s.user == user
        if msg.content.get("keepalive") and mine:
            s.client_seen, s.detached = time.monotonic(), False
        if isinstance(rid, str) and rid:
            if mine:
                why = self._claim(ident, s, rid, _count(msg.content.get("seen")))
            else:
                why = f"session {msg.session} {self.d.sessions.ended.get(msg.session) or 'has no worker here'}"
            content["known"] = not why
            if why:
                content["why"] = why
                self.log.info("told a client its %s will not be answered: %s", rid, why)
        self.d.front.reply(ident, msg, content, P.Msg.PONG)

    def _claim(self, ident: bytes, s: Session, rid: str, seen: int) -> str:
        """Route ``rid``'s output to ``ident`` from now on; "" if it will come, else why not."""
        if s.state == "adopting":  # answered when its worker is back (worker_ready)
            s.claim = (ident, rid, seen)
            return ""
        if s.answer is not None:  # an attached kernel follows it
            if s.answer.id != rid:
                return TAKEN_OVER
            s.client = ident
            self._replay(s, ident, seen, s.answer)
            return ""
        logged = s.log is not None and s.log.request == rid
        if s.current is not None and s.current.id == rid:
            s.client = ident
        elif not logged:
            return "this daemon does not know the request"
        if logged:
            self._replay(s, ident, seen, None)
        return ""

    # ------------------------------------------------------------------ after a restart

    def worker_ready(self, s: Session, content: dict) -> None:
        """An adopted worker is back. If it names the cell it runs (or ran last), that
        cell is this session's current request again; its output follows from its journal.
        A cell that already ended leaves the session idle: the notebook may send its next
        cell at once, before the journal (that cell's DONE) has been relayed."""
        running = content.get("running")
        rid = running.get("id") if isinstance(running, dict) else None
        if isinstance(rid, str) and P.ID_RE.match(rid) and rid:
            s.current = P.Message(P.Msg.EXECUTE, {}, s.id, id=rid)
            if not running.get("done"):
                s.state = "busy"
            elapsed = running.get("elapsed_s")
            s.cell_started = time.monotonic() - (elapsed if isinstance(elapsed, (int, float)) else 0.0)
            s.cell_done.clear()
            self.journal(s).reset(rid)  # its output follows to the notebook's routing id, kept in the record
            if s.state == "busy":
                self.d.accounting.watch(s, s.current)  # its limits hold across the restart
        claim, s.claim = s.claim, None
        if claim is None:
            return
        ident, wanted, _seen = claim
        if s.current is not None and s.current.id == wanted:
            s.client = ident  # the journal that follows goes to it; it drops what it saw
        elif wanted in s.waiting:
            pass  # a request that came after the restart: it runs now that the worker is back
        else:
            self.d.front.fail(ident, wanted, P.Err.RESTARTED, restarted_text(s.id))

    # ------------------------------------------------------------------ another kernel

    def attach(self, ident: bytes, msg: P.Message, user: str) -> Awaitable[None] | None:
        """Inline (a ping that follows must find the session attached), unless the session
        waits for its adopted worker."""
        s = self._target(msg, user)
        if isinstance(s, str):
            self.d.front.fail(ident, msg, P.Err.NO_SESSION, s)
        elif s.state == "adopting":
            return self._attach_when_adopted(s, ident, msg)
        else:
            self._attach(s, ident, msg)
        return None

    async def _attach_when_adopted(self, s: Session, ident: bytes, msg: P.Message) -> None:
        await asyncio.wait_for(asyncio.shield(s.ready), self.d.worker_start_timeout)
        self._attach(s, ident, msg)

    def _attach(self, s: Session, ident: bytes, msg: P.Message) -> None:
        info = {
            "session": s.id,
            "state": s.state,
            "device": s.device,
            "count": len(s.gpus),
            "notebook": s.notebook,
            "cell_running_s": time.monotonic() - s.cell_started if s.state == "busy" else None,
        }
        self.log.info("session %s attached by another kernel (it was %s)", s.id, s.state)
        self.d.front.send(ident, msg.reply(P.Msg.ATTACHED, info))
        self._replay(s, ident, 0, msg)
        if s.state == "busy" and s.current is not None and s.current.type == P.Msg.EXECUTE:
            s.client, s.answer = ident, msg  # the cell's own DONE ends the attaching request
        elif s.log is None or not s.log.request:
            self.d.front.reply(ident, msg, {"session": s.id, "cells": 0})
        s.client_seen, s.detached = time.monotonic(), False

    def _target(self, msg: P.Message, user: str) -> Session | str:
        """The session to attach to, or why there is none."""
        live = self.d.sessions.live
        wanted = msg.content.get("session")
        if wanted:
            s = live.get(wanted) if isinstance(wanted, str) else None
            if s is None or s.user != user:
                return f"you have no session {str(wanted)[:40]!r} on this daemon: `%gpu status` lists yours"
            return s
        notebook = str(msg.content.get("notebook") or "")
        mine = [s for s in live.values() if s.user == user and s.id != msg.session and s.notebook == notebook]
        if not mine:
            return f"no session of {notebook or 'this notebook'} to attach to: `%gpu status` lists yours"
        # The one left most recently by its kernel, then the one that ran a cell last.
        return max(mine, key=lambda s: (self.detached(s), s.cell_started))

    # ------------------------------------------------------------------ kernels that went away

    def detached(self, s: Session, now: float | None = None) -> bool:
        """Its kernel pinged once and has been silent past ``client_timeout``."""
        now = time.monotonic() if now is None else now
        return bool(s.client_seen) and now - s.client_seen > self.d.client_timeout

    def orphaned(self, s: Session, now: float) -> str:
        """Why ``s`` should go: detached with nothing running for ``orphan_grace``, or ""."""
        if not self.detached(s, now):
            return ""
        if not s.detached:
            s.detached = True
            self.log.info(
                "session %s detached: its kernel sent no keepalive for %.0f s (%s)",
                s.id,
                now - s.client_seen,
                "its cell runs on" if s.state == "busy" else "kept for `%gpu attach`",
            )
        if s.state != "idle":
            return ""
        if now - max(s.client_seen + self.d.client_timeout, s.last_active) <= self.d.orphan_grace:
            return ""
        return (
            f"its notebook's kernel went away (no keepalive for {now - s.client_seen:.0f} s) and nobody attached "
            f"within orphan_grace ({self.d.orphan_grace:g} s)"
        )


def restarted_text(session: str) -> str:
    return (
        f"the jupyter-gpu daemon restarted and session {session} was not running this request any more: "
        "its output after the restart is lost. Run the cell again; `%gpu status` shows the session"
    )
