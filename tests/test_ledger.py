"""The cost ledger as a user sees it through spend reports: every cell counted once,
across daemon kills, even when a kill tore the ledger's last line."""

from __future__ import annotations

from pathlib import Path

from kernel_worker import protocol as P
from kernel_worker.daemon.paths import default_state_dir

NOTEBOOK = "analysis/a.ipynb"


def _cells(client, session: str, n: int) -> None:
    for i in range(n):
        msg = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": f"x = {i}", "notebook": NOTEBOOK}, session)
        assert client.request(msg, timeout=30).content["ok"]


def _counted(client) -> int:
    spend = client.request(P.Message(P.Msg.SPEND, {"since": 0}), timeout=10).content
    return sum(nb["cells"] for nb in spend["notebooks"] if nb["notebook"] == NOTEBOOK)


def test_spend_counts_every_cell_across_sigkills_and_a_torn_ledger_line(daemon_factory):
    d = daemon_factory()
    ledger = Path(default_state_dir(d.connection_file)) / "ledger.jsonl"
    _cells(d.client(), "before-kill", 2)
    d.kill()
    with open(ledger, "a") as f:
        f.write('{"kind": "cell", "at": 17')  # the daemon died in the middle of a record

    d = daemon_factory()
    client = d.client()
    assert _counted(client) == 2  # the torn record is skipped, not fatal
    _cells(client, "after-kill", 1)
    assert _counted(client) == 3
    d.kill()

    d = daemon_factory()
    assert _counted(d.client()) == 3  # the record written after the torn line was not glued onto it
