"""The warm pool: workers started ahead (``keep_warm``) on GPUs nobody is using, so the
next session asking for that model starts warm. Their GPUs are held meanwhile; a
session that needs them for something a warm worker cannot serve gets them back."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from kernel_worker import inventory, scheduler
from kernel_worker import protocol as P
from kernel_worker.session import WARM_PREFIX, Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon



class WarmPool:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.warm: list[Session] = []

    def refill(self) -> None:
        """After GPUs came free: top the pool up again (unless the daemon is stopping)."""
        if self.d.keep_warm and not self.d.stopping:
            self.d.spawn(self.fill())

    async def fill(self) -> None:
        """Start workers ahead, as ``keep_warm`` asks, on GPUs nobody is using."""
        for model, want in self.d.keep_warm.items():
            req = scheduler.parse(model if model == inventory.CPU else f"{model}:1")
            while sum(w.request.text == req.text for w in self.warm) < want:
                wid = WARM_PREFIX + uuid.uuid4().hex[:16]
                gpus = self.d.scheduler.allocate_now(req, wid)
                if gpus is None:
                    break  # all busy: try again when one is released
                key = P.new_key()
                w = Session(wid, req, key, P.Signer(key), gpus=gpus, user=self.d.user)
                self.warm.append(w)
                try:
                    await self.d.workers.start(w)
                except Exception as e:  # noqa: BLE001 -- a failed pool start must not stop the daemon
                    self.log.warning("could not start a warm %s worker: %s", model, e)
                    await self.d.sessions.release(w, f"warm start failed: {e}")
                    break
                w.state = "warm"
                self.d.records.save(w)
                self.log.info("warm %s worker ready (%s)", model, wid)

    def take(self, s: Session, msg: P.Message) -> Session | None:
        """Hand a ready warm worker to ``s`` when one fits (default image, no volumes)."""
        if msg.content.get("image") or msg.content.get("volumes"):
            return None
        for w in self.warm:
            if w.state == "warm" and self.d.scheduler.satisfies(s.request, w.gpus):
                break
        else:
            return None
        self.warm.remove(w)
        self.d.ledger.pool(w, time.monotonic() - w.started_at)  # the host's time, until now
        w.releasing = True  # its watcher stands down; s gets its own below
        s.wid, s.key, s.signer, s.handle, s.gpus, s.versions = w.wid, w.key, w.signer, w.handle, w.gpus, w.versions
        s.ready, s.last_heard = w.ready, w.last_heard
        for g in s.gpus:
            self.d.scheduler.holder[g.uuid] = s.id
        self.d.workers.by_wid[s.wid] = s
        s.watcher = self.d.spawn(self.d.reaper.watch(s))
        self.d.spawn(self.fill())
        return w

    async def free_for(self, req: scheduler.Request) -> bool:
        """Give back warm workers' GPUs that ``req`` could use (it needs another image,
        volumes...). True when any were freed."""
        freed = [w for w in self.warm if w.gpus and self.d.scheduler.could_use(req, w.gpus)]
        for w in freed:
            await self.d.sessions.release(w, "its GPU was needed by a session that could not use it warm")
        return bool(freed)

    def discard(self, s: Session) -> None:
        if s in self.warm:
            self.warm.remove(s)
