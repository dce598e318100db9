"""Budgets the first suite (test_budgets.py) leaves out, as the person paying sees them:
the user's monthly budget refusing a cell and stopping a running one, the notebook's
``c.GPUMagics.default_budget`` applied to a cell that gives no ``--budget``, warm idle
time spent against a budget (the idle session is let go), and a cell that ignores the
interrupt losing its worker after ``interrupt_grace``.

The simulated H100 costs $3600 an hour here: a dollar a second, so budgets are reached
in about a second."""

from __future__ import annotations

import datetime
import getpass
import re
import time
from pathlib import Path

import pytest
from support.shells import cost_of, notes, run

from kernel_worker import ledger_db
from kernel_worker import protocol as P
from kernel_worker.daemon.paths import default_state_dir

SIM = "--simulate-gpus=H100:1"
DOLLAR_A_SECOND = '--Ledger.prices={"H100": 3600, "cpu": 0}'
SLOW = "import time\nprint('started', flush=True)\ntime.sleep(120)"
HOST_MONTH = r"It resets on the 1st \(host time\); the host's operator can raise c\.Budgets\.user_per_month"
CELL_TEXT = (
    r"this cell's budget is spent: \$\d\.\d{{4}} of \${limit}; the cell was interrupted\. "
    r"Give the cell a higher --budget \(or raise c\.GPUMagics\.default_budget\)"
)


def magics(ip):
    return ip.magics_manager.registry["GPUMagics"]


def test_a_cell_is_stopped_at_the_users_monthly_budget_and_the_next_one_refused(daemon_factory, make_shell):
    d = daemon_factory(SIM, DOLLAR_A_SECOND, "--Budgets.user_per_month=0.5", "--WorkerDaemon.reap_interval=0.2")
    ip = make_shell(d)
    result, cap = run(ip, f"%%gpu H100\n{SLOW}")  # no cell budget: the month's stops it
    assert not result.success and type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    assert cap.stdout.startswith("started\n")
    stopped = cost_of(cap)["stopped"]
    assert re.fullmatch(
        r"your budget for this month is spent: \$0\.\d{4} of \$0\.50; the cell was interrupted\. " + HOST_MONTH, stopped
    ), stopped
    # Idle, it would go on costing: let go at once, and its GPU with it.
    d.log.wait_for(
        r"released: your budget for this month is spent \(\$\d\.\d{4} of \$0\.50\): its GPUs were released so idle "
        r"time stops",
        timeout=30,
    )
    result, cap = run(ip, "%%gpu H100\nprint('EXECUTED')")
    assert not result.success and "EXECUTED" not in cap.stdout
    assert re.fullmatch(
        r"your budget for this month is spent: \$\d\.\d{4} of \$0\.50; nothing ran and no GPU was taken\. "
        + HOST_MONTH,
        str(result.error_in_exec),
    ), str(result.error_in_exec)
    status = d.client().call(P.Msg.STATUS)
    assert status["sessions"] == [] and status["gpus"][0]["session"] is None


def _seed(state: Path, *spend: tuple[float, float]) -> None:
    """Ledger rows (unix time, USD) of this user, as earlier days' cells left them."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = ledger_db.connect(str(state / "ledger.sqlite"))
    rows = []
    for at, usd in spend:
        record = {"at": at, "day": ledger_db.day_of(at), "kind": "cell", "user": getpass.getuser(), "usd": usd}
        rows.append(ledger_db.row(record | {"notebook": "old.ipynb", "device": "H100", "count": 1, "seconds": usd}))
    ledger_db.insert(db, rows)
    db.close()


@pytest.mark.parametrize("whose", ["host", "user"])
def test_spend_earlier_this_month_refuses_a_cell_before_it_takes_a_gpu(daemon_factory, make_shell, tmp_path, whose):
    now = time.time()
    first = datetime.datetime.combine(datetime.date.today().replace(day=1), datetime.time()).timestamp()
    # $0.60 this month (between the 1st and now) and $100 last month, which does not count.
    _seed(Path(default_state_dir(str(tmp_path / "daemon.json"))), (first + (now - first) / 2, 0.6), (first - 3600, 100))
    limit = "--Budgets.user_per_month=" + ("0.5" if whose == "host" else "100")
    d = daemon_factory(SIM, '--Ledger.prices={"H100": 3.6}', limit)  # the refused session accrues nothing visible
    ip = make_shell(d)
    if whose == "user":  # a lower one of the user's own
        ip.run_line_magic("config", "GPUMagics.budgets = {'user_per_month': 0.5}")
    result, cap = run(ip, "%%gpu H100\nprint('EXECUTED')")
    assert not result.success and "EXECUTED" not in cap.stdout
    how = (
        "the host's operator can raise c.Budgets.user_per_month"
        if whose == "host"
        else "you set it yourself: raise c.GPUMagics.budgets['user_per_month']"
    )
    assert str(result.error_in_exec) == (
        "your budget for this month is spent: $0.6000 of $0.50; nothing ran and no GPU was taken. "
        f"It resets on the 1st (host time); {how}"
    )
    client = d.client()
    assert client.call(P.Msg.STATUS)["sessions"] == []
    [month] = [b for b in client.call(P.Msg.SPEND, {"since": 0})["budgets"] if b["scope"] == "you, this month"]
    assert month == {"scope": "you, this month", "limit_usd": 0.5, "spent_usd": pytest.approx(0.6), "left_usd": 0.0}
    result, cap = run(ip, "%%gpu cpu\nprint('free')")  # free work is never refused
    assert result.success and cap.stdout == "free\n"


def test_the_notebooks_default_budget_stops_a_cell_that_gives_none(daemon_factory, make_shell):
    d = daemon_factory(SIM, DOLLAR_A_SECOND)
    ip = make_shell(d)
    ip.run_line_magic("config", "GPUMagics.default_budget = 0.5")
    result, cap = run(ip, f"%%gpu H100\n{SLOW}")
    assert not result.success and type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    cost = cost_of(cap)
    assert cost["budget_usd"] == 0.5 and re.fullmatch(CELL_TEXT.format(limit=r"0\.50"), cost["stopped"]), cost
    assert 0.5 <= cost["usd"] < 1.5 and " of $0.50 · no reading · " in cost["line"]
    result, cap = run(ip, f"%%gpu H100 --budget 0.25\n{SLOW}")  # the cell's own --budget wins
    cost = cost_of(cap)
    assert cost["budget_usd"] == 0.25 and re.fullmatch(CELL_TEXT.format(limit=r"0\.25"), cost["stopped"]), cost
    assert 0.25 <= cost["usd"] < 1.25


def test_warm_idle_time_spends_the_budget_and_the_idle_session_is_let_go(daemon_factory, make_shell):
    d = daemon_factory(SIM, DOLLAR_A_SECOND, "--Budgets.user_per_day=1", "--WorkerDaemon.reap_interval=0.2")
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nx = 1")  # a cell of a few milliseconds: far under the budget
    assert result.success and cost_of(cap)["usd"] < 0.1
    sid = magics(ip).session_id
    # Nothing runs; the session only waits, warm, at a dollar a second.
    found = d.log.wait_for(
        rf"session {sid} released: your budget for today is spent \(\$(\d\.\d{{4}}) of \$1\.00\): its GPUs were "
        "released so idle time stops",
        timeout=30,
    )
    assert 1.0 <= float(found[1]) < 2.0  # crossed, and released at the reaper's next look (0.2 s)
    cost = d.client().call(P.Msg.COST, session=sid)
    assert cost["cells_usd"] < 0.1 and 1.0 <= cost["total_usd"] < 2.0  # the rest is its warm idle time
    assert d.client().call(P.Msg.STATUS)["gpus"][0]["session"] is None
    result, cap = run(ip, "%%gpu H100\nprint('EXECUTED')")
    assert not result.success and "EXECUTED" not in cap.stdout
    assert re.fullmatch(
        r"your budget for today is spent: \$1\.\d{4} of \$1\.00; nothing ran and no GPU was taken\. It resets at "
        r"midnight \(host time\); the host's operator can raise c\.Budgets\.user_per_day",
        str(result.error_in_exec),
    ), str(result.error_in_exec)


STUBBORN = """\
import time
print('started', flush=True)
while True:
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        print('ignored', flush=True)
"""


def test_a_cell_that_ignores_the_budgets_interrupt_loses_its_worker(daemon_factory, make_shell):
    d = daemon_factory(SIM, DOLLAR_A_SECOND, "--WorkerDaemon.interrupt_grace=1", "--WorkerDaemon.interrupt_repeat=0.3")
    ip = make_shell(d)
    assert run(ip, "%%gpu H100\nkept = 'yes'")[0].success
    sid = magics(ip).session_id
    result, cap = run(ip, f"%%gpu H100 --budget 0.5\n{STUBBORN}")
    killed = (
        "the cell reached this cell's budget and did not stop within 1 s of an interrupt, so its worker was "
        "killed; variables defined on it are lost"
    )
    assert not result.success and str(result.error_in_exec) == f"session {sid} ended: {killed}"
    assert cap.stdout.startswith("started\nignored\n")  # interrupted, again, and it went on
    # Its line says which budget, the figures, and how to raise it.
    [last] = [o.data["text/plain"] for o in cap.outputs if o.data.get("text/plain", "").startswith("stopped: ")][-1:]
    assert re.fullmatch(
        r"stopped: H100 ×1 \(simulated\) · \d\.\d\d s · \$\d\.\d{4} of \$0\.50 · no reading · stopping: "
        + CELL_TEXT.format(limit=r"0\.50"),
        last,
    ), last
    d.log.wait_for(rf"session {sid} released: {re.escape(killed)}", timeout=10)
    # The time it held the GPU past its budget is billed: 0.5 s, then the 1 s grace.
    assert d.client().call(P.Msg.COST, session=sid)["total_usd"] >= 1.5
    result, cap = run(ip, "%%gpu H100\nprint(kept)")  # the worker and its variables are gone
    assert not result.success and str(result.error_in_exec).startswith(
        "kept existed only on the remote worker, which is gone (it was released, replaced or stopped since): "
        "nothing ran."
    )
    assert f"the previous worker is gone ({killed}); its variables are lost" in notes(cap)
    result, cap = run(ip, "%%gpu H100\nprint('next')")
    assert result.success and cap.stdout == "next\n"
