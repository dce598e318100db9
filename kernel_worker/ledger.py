"""Every GPU-second, accounted for: what each cell cost, and what a session held in all
(warm idle time included) when it was released. Prices are configuration."""

from __future__ import annotations

import time

from kernel_worker.session import Session

DEFAULT_PRICES = {
    # USD per GPU-hour; typical on-demand list prices, late 2026. Override per host.
    "H200": 3.79,
    "H100": 2.99,
    "A100-80GB": 1.79,
    "A100-40GB": 1.29,
    "L40S": 0.99,
    "A10G": 0.75,
    "L4": 0.58,
    "T4": 0.35,
    "cpu": 0.0,
}


class Ledger:
    """Cost records per session id, kept after the session is released."""

    def __init__(self, prices: dict[str, float]):
        self.prices = prices
        self.cells: dict[str, list[dict]] = {}

    def price(self, s: Session | None) -> float:
        """USD per hour for what ``s`` holds (device price times GPU count)."""
        if s is None:
            return 0.0
        return float(self.prices.get(s.device, 0.0)) * max(1, len(s.gpus))

    def cell(self, s: Session) -> dict:
        """Close the cell ``s`` is running and return its cost line's numbers."""
        now = time.monotonic()
        wall = now - s.cell_started
        s.busy_s += wall
        held = now - s.started_at
        price = self.price(s)
        idle = max(0.0, held - s.busy_s)
        cell = {
            "kind": "cell",
            "device": s.device,
            "count": len(s.gpus),
            "simulated": any(g.simulated for g in s.gpus),
            "wall_s": wall,
            "usd": price * wall / 3600,
            "price_per_hour": price,
            "peak_memory_bytes": s.telemetry.peak_memory_bytes if s.telemetry.count else None,
            "mean_util": s.telemetry.mean_util,
            "session_held_s": held,
            "session_usd": price * held / 3600,
            "session_idle_s": idle,
            "session_idle_usd": price * idle / 3600,
        }
        s.cells.append(cell)
        self.cells.setdefault(s.id, []).append(cell)
        return cell

    def release(self, s: Session) -> None:
        """The session let its GPUs go: record everything it held, idle time included."""
        held = time.monotonic() - s.started_at
        self.cells.setdefault(s.id, []).append(
            {
                "kind": "release",
                "device": s.device,
                "count": len(s.gpus),
                "held_s": held,
                "idle_s": max(0.0, held - s.busy_s),
                "usd": 0.0,
                "released_usd": self.price(s) * held / 3600,
            }
        )

    def summary(self, session: str, live: Session | None) -> dict:
        """``%gpu cost``: the session's cells, and what it has held so far."""
        cells = self.cells.get(session, [])
        held = (time.monotonic() - live.started_at) if live else 0.0
        return {
            "cells": cells,
            "cells_usd": sum(c["usd"] for c in cells),
            "live_held_s": held,
            "live_usd": self.price(live) * held / 3600,
            "released_usd": sum(c.get("released_usd", 0.0) for c in cells),
        }
