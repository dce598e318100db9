"""Every GPU-second, accounted for: what each cell cost, and what a session held in all
(warm idle time included) when it was released. Prices are configuration.

Records carry wall-clock time, user and notebook, and are appended to a JSON-lines file
in the daemon's state directory, so spend per notebook and per day survives restarts.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import time
from typing import Any

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


UNKNOWN_NOTEBOOK = "(unnamed notebook)"
ROTATED = ".1"  # suffix of the ledger's previous file


class Ledger:
    """Cost records per session id, kept after the session is released."""

    def __init__(self, prices: dict[str, float], path: str = "", max_bytes: int = 0):
        self.prices = prices
        self.path = path
        self.max_bytes = max_bytes  # rotate the file past this size (0: never)
        self.cells: dict[str, list[dict]] = {}
        current = _load(path) if path else []
        self.history: list[dict] = (_load(path + ROTATED) if path else []) + current
        for record in self.history:  # %gpu cost after a restart still counts the cells before it
            if isinstance(record, dict) and isinstance(record.get("session"), str):
                self.cells.setdefault(record["session"], []).append(record)
        self._in_current = len(current)  # records of history that are in the current file
        self._file: Any = None  # kept open: an open and close per cell cost the hot path
        self._size = 0  # bytes in the current file

    def _keep(self, s: Session, record: dict) -> dict:
        record.update(at=time.time(), user=s.user, notebook=s.notebook, session=s.id)
        self.cells.setdefault(s.id, []).append(record)
        self.history.append(record)
        if self.path:
            if self._file is None:
                self._file = _open_for_append(self.path)
                self._size = self._file.tell()
            line = json.dumps(record) + "\n"  # ASCII: characters are bytes
            self._file.write(line)
            self._file.flush()  # one write(2) per record: a killed daemon loses nothing written
            self._in_current += 1
            self._size += len(line)
            if self.max_bytes and self._size > self.max_bytes:
                self._rotate()
        return record

    def _rotate(self) -> None:
        """Keep one old file: spend reports reach back that far, and the disk stays bounded."""
        self.close()
        os.replace(self.path, self.path + ROTATED)
        self.history = self.history[-self._in_current :]
        self._in_current = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def price(self, s: Session | None) -> float:
        """USD per hour for what ``s`` holds (device price times GPU count)."""
        if s is None:
            return 0.0
        return float(self.prices.get(s.device, 0.0)) * max(1, len(s.gpus))

    def usd(self, s: Session | None, seconds: float) -> float:
        """What holding ``s``'s devices for ``seconds`` costs."""
        return self.price(s) * seconds / 3600

    def cell(self, s: Session, request: str = "") -> dict:
        """Close the cell ``s`` is running and return its cost line's numbers. A cell is
        billed once: its DONE may come again from a worker that outlived a daemon restart."""
        billed = [c for c in self.cells.get(s.id, [])[-1:] if request and c.get("request") == request]
        if billed:
            return billed[0]
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
            "request": request,
        }
        s.cells.append(cell)
        return self._keep(s, cell)

    def release(self, s: Session) -> None:
        """The session let its GPUs go: record everything it held, idle time included."""
        held = time.monotonic() - s.started_at
        self._keep(
            s,
            {
                "kind": "release",
                "device": s.device,
                "count": len(s.gpus),
                "held_s": held,
                "idle_s": max(0.0, held - s.busy_s),
                "usd": 0.0,
                "released_usd": self.usd(s, held),
            },
        )

    def summary(self, session: str, live: Session | None) -> dict:
        """``%gpu cost``: the session's cells, and what it has held so far."""
        cells = self.cells.get(session, [])
        held = (time.monotonic() - live.started_at) if live else 0.0
        return {
            "cells": cells,
            "cells_usd": sum(c["usd"] for c in cells),
            "live_held_s": held,
            "live_usd": self.usd(live, held),
            "released_usd": sum(c.get("released_usd", 0.0) for c in cells),
        }

    def spend(self, user: str | None, since: float, live: list[Session]) -> dict:
        """What ``user`` (everyone: None) spent since ``since`` (unix time), per notebook and
        per day (the daemon host's local dates). Spend is what sessions held, idle time
        included: released sessions by their release record, live ones so far."""
        now = time.time()
        notebooks: dict[str, dict] = {}
        days: dict[str, float] = {}

        def add(notebook: str, at: float, usd: float, held_s: float, cells: int) -> None:
            nb = notebooks.setdefault(
                notebook or UNKNOWN_NOTEBOOK,
                {"notebook": notebook or UNKNOWN_NOTEBOOK, "usd": 0.0, "held_s": 0.0, "cells": 0, "last": 0.0},
            )
            nb["usd"] += usd
            nb["held_s"] += held_s
            nb["cells"] += cells
            nb["last"] = max(nb["last"], at)
            day = datetime.date.fromtimestamp(at).isoformat()
            days[day] = days.get(day, 0.0) + usd

        for r in self.history:
            if r.get("at", 0.0) < since or (user is not None and r.get("user") != user):
                continue
            if r.get("kind") == "release":
                add(r.get("notebook", ""), r["at"], r.get("released_usd", 0.0), r.get("held_s", 0.0), 0)
            elif r.get("kind") == "cell":
                add(r.get("notebook", ""), r["at"], 0.0, 0.0, 1)
        for s in live:
            if user is None or s.user == user:
                held = time.monotonic() - s.started_at
                add(s.notebook, now, self.usd(s, held), held, 0)
        return {
            "since": since,
            "now": now,
            "total_usd": sum(days.values()),
            "notebooks": sorted(notebooks.values(), key=lambda n: -n["usd"]),
            "days": [{"day": d, "usd": u} for d, u in sorted(days.items())],
        }


def _open_for_append(path: str) -> Any:
    """The ledger file, positioned to append whole lines: a torn last line (a crash
    mid-write) is ended first, so the next record is not glued onto it."""
    f = open(path, "a+b")
    if f.tell() > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    return io.TextIOWrapper(f, encoding="utf-8", write_through=True)


def _load(path: str) -> list[dict]:
    """Earlier records; a torn last line (a crash mid-write) is skipped, not fatal."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("at"), (int, float)):
                    out.append(record)
    except FileNotFoundError:
        pass
    return out
