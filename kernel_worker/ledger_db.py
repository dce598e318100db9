"""The ledger's storage: one sqlite database (WAL) in the daemon's state directory.

One row per thing billed: a cell (its wall time), a session's warm idle time (at its
release), a warm pool worker's idle time (the host's, billed to nobody). Sums over rows
are what reports and budgets need, so the columns they group or filter on are real
columns with indexes; the rest of a cell's cost line is kept as JSON beside them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
import uuid
from collections.abc import Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS records(
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    at REAL NOT NULL,
    day TEXT NOT NULL,
    kind TEXT NOT NULL,
    user TEXT NOT NULL,
    notebook TEXT NOT NULL,
    session TEXT NOT NULL,
    request TEXT NOT NULL,
    device TEXT NOT NULL,
    count INTEGER NOT NULL,
    seconds REAL NOT NULL,
    usd REAL NOT NULL,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_when ON records(at);
CREATE INDEX IF NOT EXISTS records_spend ON records(user, day, notebook, device, usd, at, kind, seconds, count);
CREATE INDEX IF NOT EXISTS records_session ON records(session, request);
CREATE INDEX IF NOT EXISTS records_source ON records(user, notebook, source, spec, at) WHERE source != '';
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
DROP INDEX IF EXISTS records_at;
DROP INDEX IF EXISTS records_user_day;
"""
# records_spend holds every column ``groups`` and ``total`` read, in the order of their
# GROUP BY (sqlite takes its terms in any order): a report reads that index alone, in
# order, with no sort and no table row; one user's report is a range of it. A million
# records, all users, 30 days: 0.19 s (it was 1.8 s with records_at(at, ...), which lacked
# ``day``, so sqlite read each row from the table and sorted them all). records_when is
# the retention's ``at < ?``. The two DROPs replace those of older ledgers at first start.
DAY_MARGIN_S = 2 * 86400.0  # ``day`` is the writer's local date: within 2 days of any reader's
COLUMNS = ("uid", "at", "day", "kind", "user", "notebook", "session", "request", "device", "count", "seconds", "usd")
ALL_COLUMNS = (*COLUMNS, "source", "spec", "detail")
INSERT = f"INSERT OR IGNORE INTO records({', '.join(ALL_COLUMNS)}) VALUES ({', '.join('?' * len(ALL_COLUMNS))})"
MIGRATED = "migrated_jsonl"
POOL_USER = ""  # a warm pool worker's idle time is the host's


def day_of(at: float) -> str:
    """The daemon host's local date of unix time ``at``: budgets and reports count per day."""
    return datetime.date.fromtimestamp(at).isoformat()


def connect(path: str) -> sqlite3.Connection:
    """Autocommit (each insert is its own transaction), WAL so reports read beside the
    writer, synchronous NORMAL: a killed daemon loses nothing committed (only a power cut
    may lose the last records)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # private from its first byte
    os.close(fd)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA wal_autocheckpoint=0")  # see ``checkpoint``
    db.executescript(SCHEMA)
    return db


def checkpoint(path: str) -> None:
    """Fold the WAL back into the database, on a connection of its own (a thread's): the
    writer's automatic checkpoints stalled the daemon's event loop for up to 280 ms."""
    with contextlib.closing(sqlite3.connect(path)) as c:
        c.execute("PRAGMA busy_timeout=5000")
        c.execute("PRAGMA wal_checkpoint(PASSIVE)")


def row(record: dict, source: str = "", spec: str = "") -> list:
    """A record as the row ``insert`` writes: its columns, then the whole record as JSON.
    Its ``uid`` makes a second insert of it (a replayed pending line) a no-op."""
    record.setdefault("uid", uuid.uuid4().hex)
    return [*(record.get(c, "") for c in COLUMNS), source, spec, json.dumps(record)]


def insert(db: sqlite3.Connection, rows: Iterable[list]) -> None:
    with db:
        db.executemany(INSERT, rows)


def prune(db: sqlite3.Connection, before: float) -> int:
    """Drop rows older than ``before``: the ledger's growth is bounded by its retention."""
    with db:
        return db.execute("DELETE FROM records WHERE at < ?", (before,)).rowcount


def session_records(db: sqlite3.Connection, session: str) -> list[dict]:
    cur = db.execute("SELECT detail FROM records WHERE session = ? ORDER BY id", (session,))
    return [json.loads(d) for (d,) in cur]


def billed(db: sqlite3.Connection, session: str, request: str) -> dict | None:
    """The cell record of ``request`` if it was billed already (its DONE came again)."""
    cur = db.execute(
        "SELECT detail FROM records WHERE session = ? AND request = ? AND kind = 'cell' LIMIT 1", (session, request)
    )
    found = cur.fetchone()
    return json.loads(found[0]) if found else None


def last_run(db: sqlite3.Connection, user: str, notebook: str, source: str, spec: str) -> dict | None:
    """The last time this notebook ran this cell source on this GPU spec: its estimate."""
    cur = db.execute(
        "SELECT seconds, usd, at FROM records WHERE user = ? AND notebook = ? AND source = ? AND spec = ? "
        "AND source != '' ORDER BY at DESC LIMIT 1",
        (user, notebook, source, spec),
    )
    found = cur.fetchone()
    return {"wall_s": found[0], "usd": found[1], "at": found[2]} if found else None


def total(db: sqlite3.Connection, user: str, first_day: str, notebook: str | None = None) -> float:
    """What ``user`` (and ``notebook``, if given) spent from ``first_day`` on."""
    if notebook is None:
        cur = db.execute("SELECT SUM(usd) FROM records WHERE user = ? AND day >= ?", (user, first_day))
    else:
        cur = db.execute(
            "SELECT SUM(usd) FROM records WHERE user = ? AND day >= ? AND notebook = ?", (user, first_day, notebook)
        )
    return float(cur.fetchone()[0] or 0.0)


def groups(db: sqlite3.Connection, user: str | None, since: float) -> list[tuple]:
    """Sums since ``since`` per (user, notebook, day, device), in one pass over the rows:
    every report (by user, notebook, GPU or day, and a comparison rate per GPU model) is
    summed from these few groups. Each: user, notebook, day, device, usd, cells, seconds
    held, idle seconds, GPU-seconds, last record's time."""
    # The ``day`` bound only narrows the index range: ``at >= since`` decides, and no row
    # it keeps is dropped by the bound. ORDER BY: the groups come out as they always did.
    where, args = "day >= ? AND at >= ?", [_first_day(since), since]
    if user is not None:
        where += " AND user = ?"
        args.append(user)
    cur = db.execute(
        "SELECT user, notebook, day, device, SUM(usd), SUM(kind = 'cell'), SUM(seconds),"
        " TOTAL(CASE WHEN kind != 'cell' THEN seconds END), SUM(seconds * count), MAX(at)"
        f" FROM records WHERE {where} GROUP BY user, notebook, day, device ORDER BY user, notebook, day, device",
        args,
    )
    return cur.fetchall()


def _first_day(since: float) -> str:
    """A day no record at or after ``since`` is dated before, whatever the host's time
    zone was when it was written ("": no bound, for a time no date can hold)."""
    try:
        return day_of(since - DAY_MARGIN_S)
    except (OverflowError, OSError, ValueError):
        return ""


def read_groups(path: str, user: str | None, since: float) -> list[tuple]:
    """``groups`` on a connection of its own: reports run in a thread beside the daemon."""
    reader = sqlite3.connect(path)
    try:
        return groups(reader, user, since)
    finally:
        reader.close()


def migrate_jsonl(db: sqlite3.Connection, paths: list[str], load) -> int:  # noqa: ANN001
    """Bring the records of the old ``ledger.jsonl`` (and its rotated file) in, once: the
    files are renamed ``.migrated`` after the rows are committed, and a crash between the
    two is caught by the meta row."""
    done = db.execute("SELECT value FROM meta WHERE key = ?", (MIGRATED,)).fetchone()
    rows = []
    if not done:
        for path in paths:
            rows += [r for r in map(_from_jsonl, load(path)) if r is not None]
        with db:
            db.executemany(INSERT, rows)
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (MIGRATED, str(len(rows))))
    for path in paths:
        if os.path.exists(path):
            os.replace(path, path + ".migrated")
    return len(rows)


def _from_jsonl(r: dict) -> list | None:
    """An old record as a row: a release becomes the session's warm idle time."""
    try:
        at = float(r["at"])
        base = {
            "at": at,
            "day": day_of(at),
            "user": str(r.get("user", "")),
            "notebook": str(r.get("notebook", "")),
            "session": str(r.get("session", "")),
            "request": str(r.get("request", "")),
            "device": str(r.get("device", "")),
            "count": int(r.get("count", 0) or 0),
        }
        if r.get("kind") == "cell":
            record = {**r, **base, "seconds": float(r.get("wall_s", 0.0)), "usd": float(r.get("usd", 0.0))}
        elif r.get("kind") == "release":
            held, idle = float(r.get("held_s", 0.0)), float(r.get("idle_s", 0.0))
            usd = float(r.get("released_usd", 0.0)) * idle / held if held > 0 else 0.0
            record = {**base, "kind": "idle", "seconds": idle, "usd": usd}
        else:
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    return row(record)
