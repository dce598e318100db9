"""Spend reports (``%gpu cost``'s chart, ``jupyter gpu cost``, the REST ``cost``, the
sidebar): sums from the ledger's groups plus what live sessions have accrued and not yet
been billed, per notebook, per day (every day of the range, zero-filled), and per user,
notebook, GPU model or day on request; with what the same GPU-seconds would have cost at
each comparison rate the operator listed."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from kernel_worker.ledger import UNKNOWN_NOTEBOOK, Ledger, unbilled_s
from kernel_worker.ledger_db import day_of
from kernel_worker.session import Session

BY = ("user", "notebook", "gpu", "day")
MAX_FILL_DAYS = 366  # days with no spend are listed (as 0) back this far at most
HOST_USER = "(host)"  # the warm pool's rows are billed to nobody


@dataclass
class Part:
    """One sum of a report: a ledger group, or a live session's unbilled time."""

    user: str
    notebook: str
    day: str
    device: str
    usd: float
    cells: int
    held_s: float
    idle_s: float
    gpu_s: float
    last: float

    def key(self, by: str) -> str:
        if by == "user":
            return self.user or HOST_USER
        if by == "gpu":
            return self.device
        return self.day if by == "day" else self.notebook or UNKNOWN_NOTEBOOK


def live(s: Session, ledger: Ledger, now: float) -> Part:
    """What a live session has accrued and no record covers yet (counted as held today)."""
    seconds = unbilled_s(s)
    return Part(
        s.user,
        s.notebook,
        day_of(now),
        s.device,
        ledger.usd(s, seconds),
        0,
        seconds,
        seconds,
        seconds * max(1, len(s.gpus)),
        now,
    )


def build(parts: list[Part], since: float, now: float, by: str, rates: dict[str, dict]) -> dict:
    """The SPEND reply's sums (budgets are added by the caller)."""
    today = day_of(now)
    if now - since <= MAX_FILL_DAYS * 86400:
        first = day_of(since)
    else:  # "everything": from the first day with spend
        first = min((p.day for p in parts), default=today)
    days = {d: 0.0 for d in _days(first, today)}
    notebooks: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    gpu_s: dict[str, float] = {}
    for p in parts:
        days[p.day] = days.get(p.day, 0.0) + p.usd
        gpu_s[p.device] = gpu_s.get(p.device, 0.0) + p.gpu_s
        for table, key, name in ((notebooks, p.key("notebook"), "notebook"), (rows, p.key(by), "key")):
            if table is rows and not by:
                continue
            t = table.setdefault(key, {name: key, "usd": 0.0, "cells": 0, "held_s": 0.0, "idle_s": 0.0, "last": 0.0})
            t["usd"] += p.usd
            t["cells"] += p.cells
            t["held_s"] += p.held_s
            t["idle_s"] += p.idle_s
            t["last"] = max(t["last"], p.last)
    reply = {
        "since": since,
        "now": now,
        "total_usd": sum(days.values()),
        "today_usd": days.get(today, 0.0),
        "notebooks": sorted(notebooks.values(), key=lambda n: -n["usd"]),
        "days": [{"day": d, "usd": u} for d, u in sorted(days.items())],
    }
    if by:
        order = (lambda r: r["key"]) if by == "day" else (lambda r: -r["usd"])
        reply["rows"] = sorted(rows.values(), key=order)
    compare = {
        name: sum(float(r[dev]) * s / 3600 for dev, s in gpu_s.items() if dev in r)
        for name, r in rates.items()
        if isinstance(r, dict)
    }
    if compare:
        reply["compare"] = compare
    return reply


def _days(first: str, last: str) -> list[str]:
    d, end = datetime.date.fromisoformat(first), datetime.date.fromisoformat(last)
    out = []
    while d <= end:
        out.append(d.isoformat())
        d += datetime.timedelta(days=1)
    return out
