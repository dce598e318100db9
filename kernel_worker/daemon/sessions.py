"""A session's life: a notebook's request finds its session or starts one (queueing
for GPUs, taking a warm worker or starting a new one), each cell begins and ends,
and the session is released, by the user, the reaper or a dying worker.

The hot path (a cell for a session with an idle worker) is handled inline, with no
task: the request is relayed to the worker as the frames it arrived in.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING

from kernel_worker import bulk, chunks, inventory, scheduler
from kernel_worker import protocol as P
from kernel_worker.backends.base import VolumeError
from kernel_worker.daemon.attach import LATE_KINDS
from kernel_worker.daemon.errors import Refused
from kernel_worker.session import Session, version_mismatch

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon


NOTEBOOK_MAX_CHARS = 512
INPUT_MAX_CHARS = 1024**2  # what a user types at a remote input()
EXITED = "the cell called exit() (or raised SystemExit), which ends the worker as it would end a kernel"


class Sessions:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.live: dict[str, Session] = {}  # by session id (the notebook's)
        self.owners: dict[str, str] = {}  # session id -> the user who made it, kept after release
        self.ended: dict[str, str] = {}  # session id -> why its worker went away
        self._removing: dict[str, asyncio.Future] = {}  # session id -> done once its old worker is gone

    def add(self, s: Session) -> None:
        self.live[s.id] = s
        self.owners[s.id] = s.user

    # ------------------------------------------------------------------ requests

    def handle_run(self, ident: bytes, msg: P.Message, user: str) -> None:
        """EXECUTE or PULL: hand it to the session's worker at once when there is one
        (the hot path, no task), else queue for GPUs and start a worker first."""
        if not msg.session:
            self.d.front.fail(ident, msg, P.Err.BAD_MESSAGE, f"{msg.type} needs a session id")
            return
        moved = msg.content.get("bulk")
        if moved is not None and not bulk.valid_refs(moved, len(msg.buffers)):
            self.d.front.fail(ident, msg, P.Err.BAD_MESSAGE, "bad bulk buffer references")
            return
        if not chunks.valid_refs(msg.content.get(chunks.KEY), len(msg.buffers), self.d.max_message_bytes):
            self.d.front.fail(ident, msg, P.Err.BAD_MESSAGE, "bad streamed buffer references")
            return
        self.d.streams.claim(ident, msg)
        self._run(ident, msg, user)

    def _run(self, ident: bytes, msg: P.Message, user: str) -> None:
        front = self.d.front
        s = self.live.get(msg.session)
        if s is not None and s.state == "adopting":
            self.d.spawn(self._run_when_adopted(s, ident, msg, user))
            return
        if s is not None and s.state != "idle":
            front.fail(ident, msg, P.Err.BUSY, f"session {msg.session} is {s.state}: one request at a time")
            return
        if msg.type == P.Msg.PULL and s is None:
            why = self.ended.get(msg.session, "it has no worker")
            front.fail(ident, msg, P.Err.NO_SESSION, f"nothing to pull: {why}")
            return
        req = None
        if msg.type == P.Msg.EXECUTE and (s is None or msg.content.get("gpu")):
            try:
                req = scheduler.parse(str(msg.content.get("gpu") or scheduler.ANY))
                self.d.scheduler.check(req)
            except scheduler.SpecError as e:
                bad = "cannot provide" in str(e)
                front.fail(ident, msg, P.Err.NO_SUCH_GPU if bad else P.Err.BAD_SPEC, str(e))
                return
        if s is not None and (req is None or self.d.scheduler.satisfies(req, s.gpus)):
            refused = self.d.accounting.refusal(s, msg)
            if refused:
                front.fail(ident, msg, P.Err.BUDGET, refused)
            else:
                self.begin(s, ident, msg)
            return
        assert req is not None
        over = self.d.placement.over_limit(user, req, replacing=s)
        if over:
            front.fail(ident, msg, P.Err.UNAVAILABLE, over)
            return
        old = s
        key = P.new_key()
        s = Session(msg.session, req, key, P.Signer(key), client=ident, current=msg, user=user, notebook=_notebook(msg))
        refused = self.d.accounting.refusal(s, msg)
        if refused:  # before it takes a GPU
            front.fail(ident, msg, P.Err.BUDGET, refused)
            return
        self.add(s)  # registered now: a second request finds it starting
        self.d.spawn(self._start_then_begin(old, s, ident, msg))

    async def _run_when_adopted(self, s: Session, ident: bytes, msg: P.Message, user: str) -> None:
        """A request for a worker adopted after a restart that has not reconnected yet."""
        s.waiting.add(msg.id)  # a ping about it is answered "coming"
        try:
            await asyncio.wait_for(asyncio.shield(s.ready), self.d.worker_start_timeout)
        except asyncio.TimeoutError:
            why = "its worker did not reconnect after the daemon restarted"
            await self.release(s, why, code=P.Err.WORKER_DIED)
            self.d.front.fail(ident, msg, P.Err.WORKER_DIED, f"session {s.id} ended: {why}")
            return
        finally:
            s.waiting.discard(msg.id)
        self._run(ident, msg, user)

    async def handle_release(self, ident: bytes, msg: P.Message, user: str) -> None:
        s = self.live.get(msg.session)
        if s is not None:
            await self.release(s, "released by the user", code=P.Err.RELEASED, keep=bool(msg.content.get("keep")))
        self.d.front.reply(ident, msg, {"released": s is not None})

    async def handle_interrupt(self, ident: bytes, msg: P.Message, user: str) -> None:
        s = self.live.get(msg.session)
        done = False
        if s is not None and s.state == "busy" and s.handle is not None:
            await self.d.backend_instance.signal(s.handle, signal.SIGINT)
            done = True
        elif s is not None and s.state == "starting":
            for t in list(s.tasks):
                t.cancel()
            done = True
        self.d.front.reply(ident, msg, {"interrupted": done})

    def handle_input_reply(self, ident: bytes, msg: P.Message, user: str) -> None:
        """What the user typed at a remote input(): to the worker whose cell asked."""
        s = self.live.get(msg.session)
        value, error = msg.content.get("value"), msg.content.get("error")
        if not (isinstance(value, str) or isinstance(error, str)) or len(value or error) > INPUT_MAX_CHARS:
            self.d.front.fail(
                ident, msg, P.Err.BAD_MESSAGE, f"an input reply is one string of at most {INPUT_MAX_CHARS}"
            )
        elif s is not None and s.state == "busy" and s.current is not None and s.current.type == P.Msg.EXECUTE:
            self.d.workers.send(s, msg)
        else:
            self.log.info("dropped an input reply for session %s: no cell of it is running", msg.session)

    def begin(self, s: Session, ident: bytes, msg: P.Message) -> None:
        """Hand a request to the session's idle worker."""
        self.d.workdirs.before_cell(s)  # a warm container taken for a synced notebook gets its workspace
        if ident != s.client:  # a new client (a reconnect): a restarted daemon must know it
            s.client = ident
            if s.state == "idle":
                self.d.records.save(s)
        s.current = msg
        s.state = "busy"
        s.cell_started = time.monotonic()
        s.cell_done.clear()
        s.telemetry = inventory.Sample()
        s.notebook = _notebook(msg) or s.notebook
        s.answer = None
        if msg.content.get("keepalive"):  # its kernel pings while it lives; a silence will mean it died
            s.client_seen, s.detached = s.cell_started, False
        if msg.type == P.Msg.EXECUTE:
            self.d.attach.journal(s).reset(msg.id)
        if s.wid != s.id and msg.content.get("bulk"):
            self.d.workers.move_bulk(msg.content["bulk"], s.id, s.wid)
        self.d.streams.send_ahead(s, msg)
        self.d.workers.send(s, msg)
        if s.late and msg.type == P.Msg.EXECUTE:
            self.d.attach.deliver_late(s, msg)
        if msg.type == P.Msg.EXECUTE:
            self.d.accounting.begin(s, msg)
            if any(g.readable for g in s.gpus):
                self.d.spawn(self.d.telemetry.sample(s), s.tasks)
            timeout = msg.content.get("timeout")
            if isinstance(timeout, (int, float)) and timeout > 0:
                self.d.spawn(self.d.reaper.enforce_timeout(s, msg, float(timeout)), s.tasks)

    def from_worker(self, s: Session, msg: P.Message) -> None:
        """Relay a worker's output for the request it serves; a final reply ends the cell."""
        if s.current is None or msg.parent != s.current.id:
            if msg.type in LATE_KINDS and s.log is not None and msg.parent == s.log.request:
                self.d.attach.late(s, msg)
            elif msg.type == P.Msg.MIRROR:  # a cell's files arriving after its cell: say so, never silently
                self.log.warning("session %s: dropped its worker's workspace message for a cell not running", s.id)
            return  # else: an answer to a request that was already answered
        if msg.type == P.Msg.CHUNK:  # part of a value it sends back: on at once, unjournaled
            self.d.streams.from_worker(s, msg)
            return
        if msg.type == P.Msg.MIRROR:  # its copy of the workspace: the daemon's to answer
            self.d.mirrors.handle(s, msg)
            return
        if not self.d.attach.keep(s, msg):
            return  # sent again by a worker that reconnected: already here
        msg.session = s.id
        if s.wid != s.id and msg.content.get("bulk"):
            self.d.workers.move_bulk(msg.content["bulk"], s.wid, s.id)
        if msg.type == P.Msg.DONE:
            msg.content["cost"] = self.d.accounting.done(s, msg)
        if msg.type in (P.Msg.DONE, P.Msg.VALUES, P.Msg.NEED):
            s.state = "idle"
            s.current = None
            s.last_active = time.monotonic()
            s.cell_done.set()
        if msg.type != P.Msg.DONE or not self.d.workdirs.after_cell(s, msg):  # after_cell relays it, counted
            self.d.attach.relay(s, msg)
        if msg.type == P.Msg.DONE and msg.content.get("exit"):
            self.release_now(s, EXITED)

    # ------------------------------------------------------------------ start

    async def _start_then_begin(self, old: Session | None, s: Session, ident: bytes, msg: P.Message) -> None:
        if old is not None:
            old.moving = True
            await self.release(old, f"moved from {old.request.text} to {s.request.text}")
        removing = self._removing.get(s.id)
        if removing is not None:  # the previous worker of this id (same socket, same directories) is going
            try:
                await asyncio.wait_for(asyncio.shield(removing), self.d.worker_start_timeout)
            except asyncio.TimeoutError:
                self.log.warning("the previous worker of session %s is still being removed; starting anyway", s.id)
        if await self._start(s, ident, msg):
            self.begin(s, ident, msg)

    async def _start(self, s: Session, ident: bytes, msg: P.Message) -> bool:
        """GPUs for ``s`` (a warm worker's, free ones, or after queueing), then its worker.
        True when it started; otherwise the client has been told why."""
        previous = self.ended.pop(s.id, None)
        t0 = time.monotonic()
        me = asyncio.current_task()
        s.tasks.add(me)  # so an interrupt can cancel the wait
        warm = None
        try:
            warm = self.d.pool.take(s, msg)
            if warm is None:
                await self.d.placement.allocate(s, ident, msg)
            s.started_at = time.monotonic()
            if warm is None:
                await self.d.workers.start(s, self.d.placement.waiting(s, ident, msg))
            waited = s.started_at - t0  # in a queue: the daemon's, or the backend's own
            self.d.records.save(s)
            restored = await self.d.snapshots.after_start(s, msg)
            mismatch = version_mismatch(msg.content.get("client_versions") or {}, s.versions)
            if mismatch:
                raise Refused(P.Err.VERSION, mismatch)
            if s.watcher is not None and s.watcher.done():
                raise RuntimeError(f"the worker ended right after it started; see {self.d.workers.log_path(s.wid)}")
        except (Exception, asyncio.CancelledError) as e:
            await self._start_failed(s, ident, msg, e)
            if isinstance(e, asyncio.CancelledError) and self.d.stopping:
                raise
            return False
        finally:
            s.tasks.discard(me)
        s.state = "idle"
        info = {
            "gpus": [g.to_json() for g in s.gpus],
            "device": s.device,
            "waited_s": waited,
            "start_s": time.monotonic() - s.started_at,
            "cold": warm is None,
            "warm_for_s": time.monotonic() - warm.started_at if warm else 0.0,
            "previous": previous,
            "versions": s.versions,
            "idle_timeout": self.d.idle_timeout,
            "price_per_hour": self.d.ledger.price(s),
            "restored": restored,
        }
        self.d.front.send(ident, msg.reply(P.Msg.STARTED, info))
        return True

    async def _start_failed(self, s: Session, ident: bytes, msg: P.Message, e: BaseException) -> None:
        self.forget(s)
        await self.stop(s)
        if isinstance(e, Refused):
            code, text = e.code, e.text
        elif isinstance(e, asyncio.CancelledError):
            code, text = P.Err.RELEASED, "interrupted while waiting for a GPU or a worker; nothing ran"
        else:
            self.log.warning("worker for %s failed to start: %s", s.id, e)
            code = P.Err.VOLUME if isinstance(e, VolumeError) else P.Err.WORKER_START
            text = f"could not start a worker: {e}"
        self.d.front.fail(ident, msg, code, text)

    # ------------------------------------------------------------------ end

    def forget(self, s: Session) -> None:
        """Take ``s`` out of every table; ``stop`` follows. Until it is done, a new session of
        this id waits (its worker's socket and directories have the same names) and the GPUs
        stay held (the next session must not get a GPU a live process still uses)."""
        if s.releasing:
            return  # a release and a failed start may both get here
        if self.live.get(s.id) is s:
            del self.live[s.id]
        self.d.pool.discard(s)
        s.releasing = True
        self._removing[s.id] = asyncio.get_running_loop().create_future()

    async def stop(self, s: Session) -> None:
        """Stop a forgotten session's worker, then give its GPUs and its id back."""
        try:
            await self.d.workers.stop(s)
        finally:
            if s.log is not None:
                s.log.close()
            self.d.scheduler.release(s.gpus)
            s.gpus = []
            gone = self._removing.pop(s.id, None)
            if gone is not None and not gone.done():
                gone.set_result(None)

    async def release(self, s: Session, why: str, code: str = P.Err.RELEASED, keep: bool = False) -> None:
        """Stop the worker and return its GPUs; a request in flight gets a FAIL saying why.
        ``keep``: an idle worker first writes a snapshot of its namespace."""
        task = self.release_now(s, why, code, keep)
        if task is not None:
            await task

    def release_now(self, s: Session, why: str, code: str = P.Err.RELEASED, keep: bool = False) -> asyncio.Task | None:
        """``release``, with the session out of every table before this returns (the
        notebook's next request, however soon, starts a new one) and its worker removed by
        the task returned."""
        if s.releasing:
            return None
        return self.d.spawn(self._stop(s, self._retire(s, why), why, code, keep))

    def _retire(self, s: Session, why: str) -> P.Message | None:
        self.log.info("session %s ending: %s", s.id, why)
        current = s.current if s.state == "busy" else None
        if current is not None and current.type == P.Msg.EXECUTE:  # a cell that ends with its worker is billed too
            figures = {**s.telemetry.figures(), **({"stopped": s.stopped} if s.stopped else {})}
            self.d.ledger.cell(s, current.id, s.source, figures)
        self.d.ledger.release(s)
        self.forget(s)
        for t in list(s.tasks):
            if t is not asyncio.current_task():
                t.cancel()
        self.ended[s.id] = why
        return current

    async def _stop(self, s: Session, current: P.Message | None, why: str, code: str, keep: bool) -> None:
        await self.d.snapshots.before_stop(s, keep and current is None)
        await self.stop(s)
        if current is not None and s.client:
            self.d.front.fail(s.client, s.answer or current, code, f"session {s.id} ended: {why}")
        self.log.info("session %s released: %s", s.id, why)
        self.d.pool.refill()  # its GPUs may refill the pool


def _notebook(msg: P.Message) -> str:
    """The notebook's path as its kernel says it: kept in every ledger record, so bounded
    and printable."""
    text = str(msg.content.get("notebook") or "")[:NOTEBOOK_MAX_CHARS]
    return "".join(c if c.isprintable() else "?" for c in text)
