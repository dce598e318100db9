"""Ending what nobody ends by asking: sessions idle past ``idle_timeout``, sessions
whose kernel went away (past ``orphan_grace``), workers that went silent or died on
their own, cells past their ``--timeout``, and the embedded daemon itself once nothing
uses it."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING

from kernel_worker import protocol as P
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon


class Reaper:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log

    async def run(self) -> None:
        d = self.d
        while True:
            await asyncio.sleep(d.reap_interval)  # a periodic timer, not a synchronisation
            now = time.monotonic()
            for s in list(d.sessions.live.values()):
                try:
                    self._look_at(s, now)
                except Exception:  # one session's trouble (a full disk, say) must not end the reaper
                    self.log.exception("could not check session %s for release", s.id)
            d.streams.expire(now)
            quiet = now - d.front.last_request
            if d.exit_when_idle and not d.sessions.live and quiet > d.exit_when_idle:
                self.log.info("no sessions and no requests for %.0f s: exiting", quiet)
                d.stop()

    def _look_at(self, s: Session, now: float) -> None:
        d = self.d
        orphaned = d.attach.orphaned(s, now)
        if orphaned:
            d.sessions.release_now(s, orphaned, keep=d.snapshots.on_idle_release)
        elif s.state == "idle" and now - s.last_active > d.idle_timeout:
            why = f"it was idle for more than {d.idle_timeout:g} s (idle_timeout)"
            d.sessions.release_now(s, why, keep=d.snapshots.on_idle_release)
        elif s.state == "idle" and (over := d.budgets.idle_over(s)):
            d.sessions.release_now(s, over, code=P.Err.BUDGET)
        elif s.state != "starting" and now - s.last_heard > d.worker_heartbeat_timeout:
            why = f"its worker sent no heartbeat for {d.worker_heartbeat_timeout:g} s and was stopped"
            d.sessions.release_now(s, why, code=P.Err.WORKER_DIED)

    async def watch(self, s: Session) -> None:
        """End the session cleanly when its worker dies on its own."""
        exit = await self.d.backend_instance.wait(s.handle)
        self.d.workers.abandon(s.wid, f"the worker {exit.reason}")  # a snapshot it was writing, say
        if s.releasing or s.state == "starting":
            return  # a start in progress sees this task end and fails with the reason itself
        why = f"its worker {exit.reason}"
        if s.state == "busy":
            why += " while running the cell"
        await self.d.sessions.release(
            s,
            f"{why}; variables defined on the worker are lost, the next cell starts a fresh one "
            f"(worker log: {self.d.workers.log_path(s.wid)})",
            code=P.Err.WORKER_DIED,
        )

    async def enforce_timeout(self, s: Session, msg: P.Message, timeout: float) -> None:
        """A cell past ``--timeout`` is interrupted; one that ignores the interrupt for
        ``interrupt_grace`` seconds loses its worker."""
        try:
            await asyncio.wait_for(s.cell_done.wait(), timeout)
            return
        except asyncio.TimeoutError:
            pass
        if s.current is not msg or s.state != "busy":
            return
        note = f"\n[jupyter-gpu] cell passed --timeout {timeout:g} s: interrupting\n"
        self.d.attach.relay(s, msg.reply(P.Msg.STREAM, {"name": "stderr", "text": note}))
        await self._interrupt(s, f"the cell passed --timeout {timeout:g} s", P.Err.TIMEOUT)

    async def stop_cell(self, s: Session, msg: P.Message, why: str, short: str, code: str) -> None:
        """Stop a running cell for a reason of the daemon's (a budget): the reason goes to
        its live status line at once and into its cost line."""
        s.stopped = why
        self.d.attach.relay(s, msg.reply(P.Msg.PROGRESS, self.d.telemetry.reading(s)))
        await self._interrupt(s, short, code)

    async def _interrupt(self, s: Session, why: str, code: str) -> None:
        """SIGINT, again every ``interrupt_repeat`` seconds (one that lands before the worker
        runs the cell's code is ignored); a cell still running ``interrupt_grace`` seconds
        after the first loses its worker."""
        deadline = time.monotonic() + self.d.interrupt_grace
        while True:
            await self.d.backend_instance.signal(s.handle, signal.SIGINT)
            try:
                await asyncio.wait_for(
                    s.cell_done.wait(), max(0.0, min(deadline - time.monotonic(), self.d.interrupt_repeat))
                )
                return
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    break
        await self.d.sessions.release(
            s,
            f"{why} and did not stop within {self.d.interrupt_grace:g} s of an interrupt, so its worker was "
            "killed; variables defined on it are lost",
            code=code,
        )
