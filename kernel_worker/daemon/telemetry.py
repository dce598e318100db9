"""What a running cell's notebook hears while it runs: GPU samples (pynvml, for real
GPUs) and a progress message every ``progress_interval`` from one daemon timer (no task
per cell): elapsed time, dollars so far (and of what budget), utilisation and memory,
and what the cell cost the last time it ran.

A simulated GPU never invents readings: it has none, and the notebook says so."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from kernel_worker import inventory
from kernel_worker import protocol as P
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon


class Telemetry:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon

    async def sample(self, s: Session) -> None:
        """Sample ``s``'s GPUs until its cell ends."""
        while s.state == "busy":
            inventory.sample(s.gpus, s.telemetry, time.monotonic())
            try:
                await asyncio.wait_for(s.cell_done.wait(), self.d.telemetry_interval)
            except asyncio.TimeoutError:
                continue

    async def progress(self) -> None:
        """Tell each running cell's notebook how it is going (its live status line)."""
        interval = self.d.progress_interval
        while True:
            await asyncio.sleep(interval)  # a periodic timer, not a synchronisation
            now = time.monotonic()
            for s in list(self.d.sessions.live.values()):
                msg = s.current
                if s.state != "busy" or msg is None or msg.type != P.Msg.EXECUTE:
                    continue
                elapsed = now - s.cell_started
                if elapsed >= interval:
                    self.d.attach.relay(s, msg.reply(P.Msg.PROGRESS, self.reading(s, elapsed)))

    def reading(self, s: Session, elapsed: float | None = None) -> dict:
        t = s.telemetry
        elapsed = time.monotonic() - s.cell_started if elapsed is None else elapsed
        out = {
            "elapsed_s": elapsed,
            "usd": self.d.ledger.usd(s, elapsed),
            "device": s.device,
            "count": len(s.gpus),
            "simulated": any(g.simulated for g in s.gpus),
            "util": t.last_util,
            "memory_used_bytes": t.last_memory_bytes,
            "memory_bytes": sum(g.memory_bytes for g in s.gpus),
            "energy_j": t.energy_j,
        }
        if s.estimate:
            out["estimate"] = s.estimate
        if s.stopped:  # every later reading keeps saying why the cell is being stopped
            out["stopping"] = s.stopped
        cell_budget = self.d.budgets.limits(s).get("cell")
        if cell_budget:
            out["budget_usd"] = cell_budget[0]
        return out
