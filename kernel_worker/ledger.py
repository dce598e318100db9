"""Every GPU-second, accounted for: what each cell cost, what a session held idle between
cells, and what the warm pool held for nobody. Prices and billing rules are the
operator's (``c.Ledger.*``); the records are a sqlite database in the daemon's state
directory (``ledger_db``), so spend per notebook, user and day survives restarts and
budgets can be summed from it.

Writes leave the hot path: a cell's record is built at once (its cost line needs it)
and committed right after the cell's DONE has been relayed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sqlite3
import time
from typing import Any

from traitlets import Dict, Float
from traitlets.config import LoggingConfigurable

from kernel_worker import ledger_db as db
from kernel_worker.prices import DEFAULT_PRICES, billed_seconds
from kernel_worker.session import WARM_PREFIX, Session

UNKNOWN_NOTEBOOK = "(unnamed notebook)"
POOL_NOTEBOOK = "(warm pool)"
DB_NAME = "ledger.sqlite"
PENDING_NAME = "ledger.pending"
OLD_FILES = ("ledger.jsonl.1", "ledger.jsonl")  # the JSON-lines ledger before sqlite, oldest first
DAY_S = 86400.0
CHECKPOINT_EVERY = 100  # commits between WAL checkpoints (sqlite's own would run on the event loop)
MOST_REMEMBERED = 100_000  # last runs kept in memory for estimates


class Ledger(LoggingConfigurable):
    prices = Dict(
        DEFAULT_PRICES, help="USD per device-hour by model name (H100, A100-80GB, ..., cpu) on this host."
    ).tag(config=True)
    compare_with = Dict(
        {},
        help='Other rates the cost line and reports also show, e.g. {"cloud": {"H100": 3.95}}: what the same '
        "GPU-seconds would have cost there (the seconds as billed here).",
    ).tag(config=True)
    increment_s = Float(
        0.0, help="Bill in whole increments of this many seconds, rounded up, as some clouds do (0: exact)."
    ).tag(config=True)
    minimum_s = Float(
        0.0, help="Least a session is billed for, in seconds (as a cloud's per-instance minimum); 0: none."
    ).tag(config=True)
    commit_delay_s = Float(
        0.2,
        help="Records are committed in batches this long after the first; each is safe on disk at once (a "
        "journal line), so a killed daemon loses none.",
    ).tag(config=True)
    retention_days = Float(
        400.0, help="Ledger records older than this many days are deleted (at start and once a day)."
    ).tag(config=True)

    def __init__(self, state_dir: str, **kw: Any):
        super().__init__(**kw)
        self.path = os.path.join(state_dir, DB_NAME)
        self.db = db.connect(self.path)
        moved = db.migrate_jsonl(self.db, [os.path.join(state_dir, f) for f in OLD_FILES], _load_jsonl)
        if moved:
            self.log.info("moved %d records from ledger.jsonl into %s", moved, self.path)
        # Records not yet in the database, one JSON line each, written before the cell's
        # DONE is relayed (a write(2), not a commit): a daemon killed before its commit
        # loses none. Replayed (and emptied) at start.
        pending = os.path.join(state_dir, PENDING_NAME)
        replayed = [r for r in _load_jsonl(pending, key="record") if isinstance(r["record"], dict)]
        db.insert(self.db, [db.row(r["record"], str(r.get("source", "")), str(r.get("spec", ""))) for r in replayed])
        self._journal = os.open(pending, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_APPEND, 0o600)
        self._pending: list[list] = []
        self._commits = 0
        self._last_runs: dict[tuple, dict] = {}  # (user, notebook, source, spec) -> its last run, this daemon's life
        self._totals: dict[tuple, float] = {}  # (user, first day, notebook or None) -> usd, kept current
        self._pruned_day = ""
        self.prune()

    # ------------------------------------------------------------------ prices

    def price(self, s: Session | None) -> float:
        """USD per hour for what ``s`` holds (device price times GPU count)."""
        if s is None:
            return 0.0
        return float(self.prices.get(s.device, 0.0)) * max(1, len(s.gpus))

    def usd(self, s: Session | None, seconds: float) -> float:
        """What holding ``s``'s devices for ``seconds`` costs, as it accrues (not rounded)."""
        return self.price(s) * seconds / 3600

    def session_usd(self, s: Session, now: float | None = None) -> float:
        """What ``s`` has cost so far: its cells (and snapshots) as billed, rounded as the
        host bills, plus the warm idle time it has accrued (rounded at its release)."""
        return self.usd(s, s.billed_s + unbilled_s(s, now))

    def billed(self, seconds: float) -> float:
        return billed_seconds(seconds, self.increment_s)

    def compare(self, device: str, count: int, seconds: float) -> dict[str, float]:
        """What ``seconds`` of ``count`` ``device`` would cost at each comparison rate."""
        out = {}
        for name, rates in self.compare_with.items():
            if isinstance(rates, dict) and device in rates:
                out[str(name)] = float(rates[device]) * max(1, count) * seconds / 3600
        return out

    # ------------------------------------------------------------------ records

    def cell(self, s: Session, request: str = "", source: str = "", telemetry: dict | None = None) -> dict:
        """Close the cell ``s`` is running and return its cost line's numbers. A cell is
        billed once: its DONE may come again from a worker that outlived a daemon restart."""
        if request and s.cells and s.cells[-1].get("request") == request:
            return s.cells[-1]
        if request and s.adopted and not s.cells:  # its DONE may have been billed before the restart
            self.flush()
            done = db.billed(self.db, s.id, request)
            if done is not None:
                return done
        now = time.monotonic()
        wall = now - s.cell_started
        s.busy_s += wall
        seconds = self.billed(wall)
        s.billed_s += seconds
        held = now - s.started_at
        price = self.price(s)
        idle = max(0.0, held - s.busy_s)
        cell = {
            "kind": "cell",
            "device": s.device,
            "count": len(s.gpus),
            "simulated": any(g.simulated for g in s.gpus),
            "wall_s": wall,
            "seconds": seconds,
            "usd": price * seconds / 3600,
            "price_per_hour": price,
            **(telemetry or {}),
            "session_held_s": held,
            "session_usd": self.session_usd(s, now),
            "session_idle_s": idle,
            "session_idle_usd": price * idle / 3600,
            "request": request,
            "spec": s.request.text,
        }
        compare = self.compare(s.device, len(s.gpus), seconds)
        if compare:
            cell["compare"] = compare
        s.cells.append(cell)
        return self._keep(s, cell, source)

    def release(self, s: Session) -> None:
        """The session let its GPUs go: bill its warm idle time (topped up to the host's
        minimum). A warm pool worker's idle time is the host's, billed to nobody."""
        held = time.monotonic() - s.started_at
        if s.id.startswith(WARM_PREFIX):
            self.pool(s, held)
            return
        seconds = max(self.billed(max(0.0, held - s.busy_s)), self.minimum_s - s.billed_s)
        record = {"kind": "idle", "device": s.device, "count": len(s.gpus), "seconds": seconds, "held_s": held}
        self._keep(s, {**record, "usd": self.usd(s, seconds)})

    def timed(self, s: Session, kind: str, seconds: float) -> dict:
        """A snapshot's write or restore: the GPUs are held meanwhile, billed apart from cells."""
        s.busy_s += seconds  # not warm idle time
        billed = self.billed(seconds)
        s.billed_s += billed
        record = {"kind": kind, "device": s.device, "count": len(s.gpus), "seconds": billed}
        return self._keep(s, {**record, "usd": self.usd(s, billed)})

    def pool(self, w: Session, seconds: float) -> None:
        """A warm worker's time on its GPUs before a session took it (or it was let go)."""
        record = {"kind": "pool", "device": w.device, "count": len(w.gpus), "seconds": seconds}
        self._write({**record, "usd": self.usd(w, seconds), "user": db.POOL_USER, "notebook": POOL_NOTEBOOK})

    def _keep(self, s: Session, record: dict, source: str = "") -> dict:
        record.update(user=s.user, notebook=s.notebook, session=s.id)
        self._write(record, source, s.request.text)
        if source:
            if len(self._last_runs) > MOST_REMEMBERED:
                self._last_runs.clear()
            run = {"wall_s": record["seconds"], "usd": record["usd"], "at": record["at"]}
            self._last_runs[(s.user, s.notebook, source, s.request.text)] = run
        return record

    def _write(self, record: dict, source: str = "", spec: str = "") -> None:
        record.setdefault("session", "")
        record["at"] = at = time.time()
        record["day"] = day = db.day_of(at)
        for (user, first, notebook), usd in self._totals.items():
            if user == record["user"] and day >= first and notebook in (None, record["notebook"]):
                self._totals[(user, first, notebook)] = usd + record["usd"]
        row = db.row(record, source, spec)
        line = f'{{"source": {json.dumps(source)}, "spec": {json.dumps(spec)}, "record": {row[-1]}}}\n'
        try:
            os.write(self._journal, line.encode())  # the record is safe from here on
        except OSError as e:  # a full disk: kept in memory until a commit takes it
            self.log.error("ledger: could not journal a record (%s); it is kept in memory until committed", e)
        self._pending.append(row)
        if len(self._pending) == 1:
            try:  # committed in batches, off the cells' path: back-to-back cells share a commit
                asyncio.get_running_loop().call_later(self.commit_delay_s, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        if self._pending:
            try:
                db.insert(self.db, self._pending)
            except sqlite3.Error as e:  # a full disk: kept (and journalled) for the next commit
                self.log.error("ledger: %d records not committed yet: %s", len(self._pending), e)
                asyncio.get_running_loop().call_later(self.commit_delay_s * 10, self.flush)
                return
            self._pending = []
            os.ftruncate(self._journal, 0)  # committed: nothing is pending
            self._commits += 1
            if self._commits % CHECKPOINT_EVERY == 0:  # the WAL folded back, in a thread: no stall here
                try:
                    asyncio.get_running_loop().run_in_executor(None, db.checkpoint, self.path)
                except RuntimeError:  # no loop (closing): here, then
                    db.checkpoint(self.path)
        today = db.day_of(time.time())
        if today != self._pruned_day:
            self.prune()

    def prune(self) -> None:
        self._pruned_day = db.day_of(time.time())
        gone = db.prune(self.db, time.time() - self.retention_days * DAY_S)
        if gone:
            self.log.info("ledger: deleted %d records older than %g days (retention_days)", gone, self.retention_days)
        self._totals.clear()

    def close(self) -> None:
        self.flush()
        self.db.close()
        os.close(self._journal)

    # ------------------------------------------------------------------ questions

    def spent(self, user: str, first_day: str, notebook: str | None = None) -> float:
        """What ``user`` (in ``notebook``, if given) was billed from ``first_day`` on; kept
        in memory once asked, so a budget checked every second costs no query."""
        key = (user, first_day, notebook)
        if key not in self._totals:
            self.flush()
            self._totals[key] = db.total(self.db, user, first_day, notebook)
        return self._totals[key]

    def estimate(self, s: Session, source: str) -> dict | None:
        """The last run of this cell source on this spec in this notebook, if any."""
        if not source:
            return None
        key = (s.user, s.notebook, source, s.request.text)
        if key not in self._last_runs:  # before this daemon's life: committed long ago
            self._last_runs[key] = db.last_run(self.db, *key)
        return self._last_runs[key]

    def summary(self, session: str, live: Session | None) -> dict:
        """``%gpu cost``: the session's cells, and what it has held so far."""
        self.flush()
        records = db.session_records(self.db, session)
        cells = [r for r in records if r.get("kind") == "cell"]
        held = (time.monotonic() - live.started_at) if live else 0.0
        return {
            "cells": cells,
            "snapshots": [r for r in records if r.get("kind") in ("snapshot", "restore")],
            "cells_usd": sum(c["usd"] for c in cells),
            "live_held_s": held,
            "live_usd": self.usd(live, held),
            "total_usd": sum(r["usd"] for r in records) + self.unbilled(live),
        }

    def unbilled(self, s: Session | None) -> float:
        """What a live session has accrued and not yet been billed for: its running
        cell so far and its warm idle time so far."""
        return self.usd(s, unbilled_s(s)) if s is not None else 0.0


def unbilled_s(s: Session, now: float | None = None) -> float:
    """Seconds ``s`` has held its devices that no record covers yet (at monotonic ``now``)."""
    return max(0.0, (time.monotonic() if now is None else now) - s.started_at - s.busy_s)


def _load_jsonl(path: str, key: str = "at") -> list[dict]:
    """Records of a JSON-lines file (the old ledger; pending records), each with ``key``;
    a torn line (a crash mid-write) is skipped."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get(key) is not None:
                    out.append(record)
    except FileNotFoundError:
        pass
    return out


def local_midnight(at: float) -> float:
    d = datetime.date.fromtimestamp(at)
    return datetime.datetime.combine(d, datetime.time()).timestamp()
