"""Where a new session's GPUs come from: the per-user limits, free GPUs now (taking them
from the warm pool if need be), or a place in the daemon's FIFO queue with its position
told to the notebook; and, for a backend with a scheduler of its own (Slurm), where its
worker waits there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from kernel_worker import protocol as P
from kernel_worker import scheduler
from kernel_worker.daemon.errors import Refused
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 11th, 22nd: a place in a queue, as the notebook shows it."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class Placement:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon

    def over_limit(self, user: str, req: scheduler.Request, replacing: Session | None) -> str:
        """Why ``user`` may not start another session for ``req`` now ("" when they may)."""
        mine = [s for s in self.d.sessions.live.values() if s.user == user and s is not replacing]
        most_sessions, most_gpus = self.d.max_sessions_per_user, self.d.max_gpus_per_user
        if most_sessions and len(mine) >= most_sessions:
            return (
                f"you already hold {len(mine)} session(s), the most this host allows per user "
                f"(max_sessions_per_user={most_sessions}): `%gpu release` one first"
            )
        want = min((n for _, n in req.alternatives), default=0)
        held = sum(len(s.gpus) for s in mine)
        if most_gpus and held + want > most_gpus:
            return (
                f"you hold {held} GPU(s); {req.text} would take you past this host's limit of "
                f"{most_gpus} per user (max_gpus_per_user): `%gpu release` first"
            )
        return ""

    # ------------------------------------------------------------------ cells

    async def allocate(self, s: Session, ident: bytes, msg: P.Message) -> None:
        """Free GPUs now (giving back warm workers that cannot serve ``s`` if need be), or a
        place in the queue, with its position told to the client as it moves."""
        sched, req = self.d.scheduler, s.request
        s.gpus = sched.allocate_now(req, s.id) or []
        if s.gpus or sched.satisfies(req, []):
            return
        if await self.d.pool.free_for(req):
            s.gpus = sched.allocate_now(req, s.id) or []
            if s.gpus:
                return
        if msg.content.get("no_wait"):
            holders = sorted(set(sched.holder.values()) - {s.id})
            raise Refused(
                P.Err.UNAVAILABLE,
                f"no {req.text} free right now (held by {len(holders)} other session(s)); "
                "drop --no-wait to queue for it",
            )
        waiting = sum(1 for o in self.d.sessions.live.values() if o.user == s.user and o.queued)
        most = self.d.max_queued_per_user
        if most and waiting >= most:
            raise Refused(
                P.Err.UNAVAILABLE,
                f"you already have {waiting} request(s) waiting for GPUs, the most this host queues per user "
                f"(max_queued_per_user={most}): wait for one, or interrupt it",
            )

        def position(n: int) -> None:
            where = f"{ordinal(n)} in queue"
            self.d.front.send(ident, msg.reply(P.Msg.QUEUED, {"position": n, "request": req.text, "where": where}))

        s.queued = True
        try:
            s.gpus = await self.d.spawn(sched.acquire(req, s.id, position, None), s.tasks)
        finally:
            s.queued = False

    def waiting(self, s: Session, ident: bytes, msg: P.Message) -> Callable[[str], None]:
        """Where a started worker waits in its backend's scheduler (Slurm's queue), told
        to the notebook as its queue line while ``s`` counts as queued."""

        def where(text: str) -> None:
            s.queued = True
            self.d.log.info("session %s waits: %s", s.id, text)
            self.d.front.send(ident, msg.reply(P.Msg.QUEUED, {"position": 0, "request": s.request.text, "where": text}))

        return where
