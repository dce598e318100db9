"""Billing as a cloud bills, end to end: whole ``c.Ledger.increment_s`` increments rounded
up, a session billed at least ``c.Ledger.minimum_s``, and ``c.Ledger.compare_with``'s rate
beside ours, as a real cell's cost line, ``%gpu cost`` and the spend report show them;
the ledger's database in WAL mode; a warm pool worker's time billed to nobody.

$3.60 an hour is $0.001 a second: a minute is $0.06, five minutes $0.30."""

from __future__ import annotations

import getpass
import json
import re
import sqlite3
from pathlib import Path

import pytest
from support.shells import cost_of, notes, run

from kernel_worker import protocol as P
from kernel_worker.daemon.paths import default_state_dir

SIM = "--simulate-gpus=H100:1"
BILLING = (
    SIM,
    '--Ledger.prices={"H100": 3.6}',
    "--Ledger.increment_s=60",
    "--Ledger.minimum_s=300",
    '--Ledger.compare_with={"cloud": {"H100": 7.2}}',
)


def ledger_rows(d) -> list[sqlite3.Row]:
    db = sqlite3.connect(Path(default_state_dir(d.connection_file)) / "ledger.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM records ORDER BY id").fetchall()
    finally:
        db.close()


def test_cells_are_billed_in_whole_increments_with_a_minimum_and_a_cloud_comparison(daemon_factory, make_shell):
    d = daemon_factory(*BILLING)
    ip = make_shell(d)
    lines = []
    for n, cell in enumerate(("x = 1", "import time\ntime.sleep(0.2)"), 1):
        result, cap = run(ip, f"%%gpu H100\n{cell}")
        assert result.success
        cost = cost_of(cap)
        # Seconds rounded up to the minute: $0.06; the cloud's $7.20 an hour: $0.12.
        assert cost["seconds"] == 60.0 and cost["wall_s"] < 1.0
        assert cost["usd"] == pytest.approx(0.06) and cost["compare"] == {"cloud": pytest.approx(0.12)}
        # The session so far: its cells as billed, and the seconds it waited between them.
        assert n * 0.06 <= cost["session_usd"] < n * 0.06 + 0.01
        took = rf"{cost['wall_s']:.2f} s \(billed 1 min 00 s\)"
        assert re.fullmatch(
            rf"⏱ H100 ×1 \(simulated\) · {took} · \$0\.0600 · no reading · cloud \$0\.1200 · "
            rf"session \$0\.{n * 6:02d}\d\d( \(warm idle \d+ s, \$0\.00\d\d\))?( · cold start \d+\.\d\d s)?",
            cost["line"],
        ), cost["line"]
        lines.append(
            f"  cell {n}: H100 ×1 (simulated) · {cost['wall_s']:.2f} s (billed 1 min 00 s) · $0.0600 · "
            "no reading · cloud $0.1200"
        )
    out = run(ip, "%gpu cost")[1].stdout.splitlines()
    assert out[:2] == lines
    assert re.fullmatch(r"cells: 2, \$0\.1200 of GPU time; session total \(warm idle included\): \$0\.12\d\d", out[2])
    assert run(ip, "%gpu release")[1].stdout == "released: worker stopped, GPUs returned\n"
    # Released after 2 minutes billed: topped up to the 5-minute minimum, exactly.
    out = run(ip, "%gpu cost")[1].stdout.splitlines()
    assert out == [*lines, "cells: 2, $0.1200 of GPU time; session total (warm idle included): $0.3000"]
    spend = d.client().call(P.Msg.SPEND, {"since": 0, "by": "gpu"})
    assert spend["total_usd"] == pytest.approx(0.3) and spend["compare"] == {"cloud": pytest.approx(0.6)}
    assert [(r["key"], r["cells"], r["held_s"]) for r in spend["rows"]] == [("H100", 2, pytest.approx(300.0))]
    kinds = [(r["kind"], r["seconds"]) for r in ledger_rows(d)]
    assert kinds == [("cell", 60.0), ("cell", 60.0), ("idle", pytest.approx(180.0))]


def test_the_ledger_database_is_in_wal_mode(daemon_factory):
    d = daemon_factory()
    msg = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": "x = 1", "notebook": "wal.ipynb"}, "wal")
    client = d.client()
    assert client.request(msg, timeout=30).content["ok"]
    assert client.call(P.Msg.SPEND, {"since": 0})["notebooks"][0]["cells"] == 1  # committed
    db = sqlite3.connect(Path(default_state_dir(d.connection_file)) / "ledger.sqlite")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # kept in the file: readers beside the writer
    finally:
        db.close()


def test_a_warm_pool_workers_time_is_billed_to_nobody(daemon_factory, make_shell):
    d = daemon_factory(
        SIM, '--Ledger.prices={"H100": 3600}', "--WorkerDaemon.keep_warm={'H100': 1}", "--Budgets.user_per_day=1000"
    )
    d.log.wait_for(r"warm H100 worker ready", timeout=30)
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nx = 1")
    assert result.success and any(n.startswith("warm start ") for n in notes(cap)), notes(cap)
    assert run(ip, "%gpu release")[1].stdout == "released: worker stopped, GPUs returned\n"
    client = d.client()
    mine = client.call(P.Msg.SPEND, {"since": 0, "by": "user"})  # flushes the ledger, too
    rows = ledger_rows(d)
    [pool] = [r for r in rows if r["kind"] == "pool"]
    assert (pool["user"], pool["notebook"], pool["session"], pool["device"], pool["count"]) == (
        "",
        "(warm pool)",
        "",
        "H100",
        1,
    )
    assert pool["seconds"] > 0 and pool["usd"] == pytest.approx(pool["seconds"])  # a dollar a second
    user = getpass.getuser()
    assert sorted(r["kind"] for r in rows if r["user"] == user) == ["cell", "idle"]
    users_usd = sum(r["usd"] for r in rows if r["user"] == user)
    # The user's spend and budget hold their own session only, not the pool's wait.
    assert [(r["key"], r["usd"]) for r in mine["rows"]] == [(user, pytest.approx(users_usd, rel=1e-9))]
    [today] = [b for b in mine["budgets"] if b["scope"] == "you, today"]
    assert today["spent_usd"] == pytest.approx(users_usd, rel=1e-9)
    everyone = client.call(P.Msg.SPEND, {"since": 0, "by": "user", "all": True})
    assert {r["key"]: r["usd"] for r in everyone["rows"]} == {
        user: pytest.approx(users_usd, rel=1e-9),
        "(host)": pytest.approx(pool["usd"], rel=1e-9),
    }


def test_a_restarted_daemon_bills_an_adopted_sessions_earlier_cells_once(daemon_factory, make_shell):
    """Cells billed before a daemon restart are not billed again as warm idle time when the
    adopted session is released: the idle record is the session's held time less its cells."""
    d = daemon_factory(SIM, '--Ledger.prices={"H100": 3.6}')
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nimport time\ntime.sleep(1.5)")
    assert result.success
    wall = cost_of(cap)["wall_s"]
    d.kill()
    d2 = daemon_factory(SIM, '--Ledger.prices={"H100": 3.6}')
    d2.log.wait_for(r"adopted the running worker of session")
    assert run(ip, "%gpu release")[0].success
    d2.stop()
    rows = [dict(r) for r in ledger_rows(d2)]
    [idle] = [r for r in rows if r["kind"] == "idle"]
    [cell] = [r for r in rows if r["kind"] == "cell"]
    held = json.loads(idle["detail"])["held_s"]
    assert cell["seconds"] == pytest.approx(wall)
    assert idle["seconds"] == pytest.approx(held - wall, abs=0.01), (idle, held, wall)


def test_a_cell_that_ends_with_its_killed_worker_is_billed_as_a_cell(daemon_factory, make_shell):
    d = daemon_factory(SIM, '--Ledger.prices={"H100": 3.6}', "--WorkerDaemon.interrupt_grace=1")
    ip = make_shell(d)
    cell = "%%gpu H100 --timeout 1\nimport signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    result, _ = run(ip, cell)
    assert "did not stop within 1 s of an interrupt" in str(result.error_in_exec)
    d.stop()
    [cell_row] = [dict(r) for r in ledger_rows(d) if r["kind"] == "cell"]
    assert 2.0 <= cell_row["seconds"] < 10.0  # the --timeout second, then the interrupt_grace one
