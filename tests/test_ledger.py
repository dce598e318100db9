"""The cost ledger as a user sees it through spend reports: every cell counted once,
across daemon kills; the old JSON-lines ledger brought into the database once; records
past their retention gone."""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from kernel_worker import protocol as P
from kernel_worker.daemon.paths import default_state_dir

NOTEBOOK = "analysis/a.ipynb"


def _cells(client, session: str, n: int) -> None:
    for i in range(n):
        msg = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": f"x = {i}", "notebook": NOTEBOOK}, session)
        assert client.request(msg, timeout=30).content["ok"]


def _mine(client) -> dict:
    spend = client.request(P.Message(P.Msg.SPEND, {"since": 0}), timeout=10).content
    return next((nb for nb in spend["notebooks"] if nb["notebook"] == NOTEBOOK), {"cells": 0, "usd": 0.0})


def test_spend_counts_every_cell_across_sigkills(daemon_factory):
    d = daemon_factory()
    _cells(d.client(), "before-kill", 2)
    d.kill()
    d = daemon_factory()
    client = d.client()
    assert _mine(client)["cells"] == 2
    _cells(client, "after-kill", 1)
    assert _mine(client)["cells"] == 3
    d.kill()
    d = daemon_factory()
    assert _mine(d.client())["cells"] == 3


def _old(at: float, **kw) -> str:
    return json.dumps({"at": at, "user": getpass.getuser(), "notebook": NOTEBOOK, **kw}) + "\n"


def test_the_old_json_lines_ledger_is_moved_into_the_database_once(daemon_factory, tmp_path):
    state = Path(default_state_dir(str(tmp_path / "daemon.json")))
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time() - 60
    cell = {"kind": "cell", "device": "H100", "count": 1, "session": "s1"}
    (state / "ledger.jsonl.1").write_text(_old(now - 30, **cell, wall_s=1.0, usd=1.0, request="r1"))
    (state / "ledger.jsonl").write_text(
        _old(now - 20, **cell, wall_s=2.0, usd=2.0, request="r2")
        + _old(
            now - 10, kind="release", device="H100", count=1, session="s1", held_s=10.0, idle_s=4.0, released_usd=10.0
        )
        + '{"kind": "cell", "at": 17'  # a daemon killed mid-record: skipped, not fatal
    )
    d = daemon_factory()
    spend = d.client().request(P.Message(P.Msg.SPEND, {"since": 0, "by": "gpu"}), timeout=10).content
    [nb] = [nb for nb in spend["notebooks"] if nb["notebook"] == NOTEBOOK]
    # Two cells ($1 + $2) and the session's warm idle time: 4 of its 10 s held, of $10.
    assert nb["cells"] == 2 and nb["usd"] == pytest.approx(7.0) and nb["held_s"] == pytest.approx(7.0)
    assert spend["rows"] == [
        {
            "key": "H100",
            "usd": pytest.approx(7.0),
            "cells": 2,
            "held_s": 7.0,
            "idle_s": 4.0,
            "last": pytest.approx(now - 10),
        }
    ]
    assert sorted(p.name for p in state.glob("ledger.jsonl*")) == ["ledger.jsonl.1.migrated", "ledger.jsonl.migrated"]
    assert os.stat(state / "ledger.sqlite").st_mode & 0o777 == 0o600
    d.stop()
    d = daemon_factory()  # moved once: a restart does not count them again
    assert _mine(d.client()) | {"last": 0} == nb | {"last": 0}


def test_records_past_their_retention_are_deleted(daemon_factory, tmp_path):
    state = Path(default_state_dir(str(tmp_path / "daemon.json")))
    d = daemon_factory()
    _cells(d.client(), "recent", 1)
    d.stop()
    db = sqlite3.connect(state / "ledger.sqlite")
    with db:  # a record from long ago, as a year-old ledger has
        db.execute(
            "INSERT INTO records(uid, at, day, kind, user, notebook, session, request, device, count, seconds,"
            " usd, source, spec, detail)"
            " VALUES ('old', ?, '2020-01-01', 'cell', 'u', 'old.ipynb', 's', '', 'H100', 1, 1, 5, '', '', '{}')",
            (time.time() - 800 * 86400,),
        )
    db.close()
    d = daemon_factory("--Ledger.retention_days=30")
    spend = d.client().request(P.Message(P.Msg.SPEND, {"since": 0, "all": True}), timeout=10).content
    assert [nb["notebook"] for nb in spend["notebooks"]] == [NOTEBOOK]
    d.log.wait_for(r"ledger: deleted 1 records older than 30 days \(retention_days\)", timeout=10)
