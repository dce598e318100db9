"""Budgets as the person paying sees them: a cell stopped at its --budget, a notebook past
its daily budget refused before it takes a GPU, a killed kernel's cell still stopped, the
limits held across a daemon restart, and the estimate a cell shows the second time.

The simulated H100 costs $3600 an hour here: a dollar a second, so budgets are reached
in about a second."""

from __future__ import annotations

import re
import time

import pytest
from support.files import wait_for_file
from support.kernels import kernel, kill
from support.shells import cost_of, run

from kernel_worker import protocol as P

DOLLAR_A_SECOND = '--Ledger.prices={"H100": 3600, "cpu": 0}'
SLOW = "import time\nprint('started', flush=True)\ntime.sleep(120)"
CELL_TEXT = (
    r"this cell's budget is spent: \$0\.\d{4} of \$0\.50; the cell was interrupted\. "
    r"Give the cell a higher --budget \(or raise c\.GPUMagics\.default_budget\)"
)


def test_a_cell_is_interrupted_when_it_reaches_its_budget_and_its_worker_lives_on(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1", DOLLAR_A_SECOND)
    ip = make_shell(d)
    assert run(ip, "%%gpu H100\nkept = 'yes'")[0].success
    result, cap = run(ip, f"%%gpu H100 --budget 0.5\n{SLOW}")
    assert not result.success and type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    assert cap.stdout.startswith("started\n") and "KeyboardInterrupt" in cap.stdout  # as a local interrupt shows
    cost = cost_of(cap)
    assert cost["budget_usd"] == 0.5 and re.fullmatch(CELL_TEXT, cost["stopped"]), cost["stopped"]
    assert 0.5 <= cost["usd"] < 0.5 + 1.0  # stopped at once: the interrupt's own time is billed too
    assert " of $0.50 · no reading · " in cost["line"] and cost["line"].endswith(" · stopped: " + cost["stopped"])
    result, cap = run(ip, "%%gpu H100\nprint(kept)")  # the worker was interrupted, not killed
    assert result.success and cap.stdout == "yes\n"


def test_a_budget_that_is_not_a_positive_number_is_refused(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1", DOLLAR_A_SECOND)
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100 --budget -3\nprint('EXECUTED')")
    assert not result.success and "EXECUTED" not in cap.stdout
    assert "a budget is a positive number of US dollars, not '-3.0' (cell)" in str(result.error_in_exec)
    client = d.client()
    for bad in ({"cell": float("nan")}, {"user_per_day": "1"}, {"everyone": 1}, {"user_per_day": True}):
        msg = P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "1", "budgets": bad}, "hostile")
        with pytest.raises(Exception) as e:
            client.request(msg, timeout=30)
        assert getattr(e.value, "code", None) == P.Err.BUDGET, bad
    assert client.call(P.Msg.STATUS)["sessions"] == []  # nothing started, no GPU taken


def test_a_notebook_past_its_daily_budget_is_refused_before_it_takes_a_gpu(daemon_factory, make_shell):
    d = daemon_factory(
        "--simulate-gpus=H100:1", DOLLAR_A_SECOND, "--Budgets.notebook_per_day=0.5", "--WorkerDaemon.reap_interval=0.2"
    )
    ip = make_shell(d)
    result, cap = run(ip, f"%%gpu H100\n{SLOW}")  # no cell budget: the notebook's daily one stops it
    assert not result.success and cap.stdout.startswith("started\n")
    assert cost_of(cap)["stopped"].startswith("this notebook's budget for today is spent: $0.")
    # Its idle session would go on costing: it is let go, and its GPU with it.
    d.log.wait_for(r"released: this notebook's budget for today is spent", timeout=30)
    assert d.client().call(P.Msg.STATUS)["gpus"][0]["session"] is None
    result, cap = run(ip, "%%gpu H100\nprint('EXECUTED')")
    assert not result.success and "EXECUTED" not in cap.stdout
    assert re.fullmatch(
        r"this notebook's budget for today is spent: \$\d\.\d{4} of \$0\.50; nothing ran and no GPU was taken\. "
        r"It resets at midnight \(host time\); the host's operator can raise c\.Budgets\.notebook_per_day",
        str(result.error_in_exec),
    ), str(result.error_in_exec)
    assert d.client().call(P.Msg.STATUS)["sessions"] == []
    # Free work is never refused: a cpu cell costs nothing.
    result, cap = run(ip, "%%gpu cpu\nprint('free')")
    assert result.success and cap.stdout == "free\n"


def test_a_user_may_set_a_lower_budget_for_themselves(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1", DOLLAR_A_SECOND, "--Budgets.user_per_day=100")
    ip = make_shell(d)
    ip.run_line_magic("config", "GPUMagics.budgets = {'user_per_day': 0.5}")
    result, cap = run(ip, f"%%gpu H100\n{SLOW}")
    assert not result.success
    stopped = cost_of(cap)["stopped"]
    assert re.fullmatch(
        r"your budget for today is spent: \$0\.\d{4} of \$0\.50; the cell was interrupted\. "
        r"It resets at midnight \(host time\); you set it yourself: raise c\.GPUMagics\.budgets\['user_per_day'\]",
        stopped,
    ), stopped
    spend = d.client().call(P.Msg.SPEND, {"since": time.time() - 60})
    [today] = spend["budgets"][:1]
    assert today["scope"] == "you, today" and today["limit_usd"] == 0.5 and today["left_usd"] < 0.01


def test_a_killed_kernels_cell_is_still_stopped_at_its_budget(daemon_factory, tmp_path):
    d = daemon_factory("--simulate-gpus=H100:1", DOLLAR_A_SECOND, "--WorkerDaemon.client_timeout=600")
    flag = tmp_path / "running"
    client = d.client()
    with kernel(d.connection_file) as (km, kc):
        kc.execute(f"%%gpu H100 --budget 2\nopen({str(flag)!r}, 'w').close()\n{SLOW}")
        wait_for_file(flag, 60)
        kill(km)  # nothing is left to interrupt the cell but the daemon
    [s] = client.call(P.Msg.STATUS)["sessions"]
    d.log.wait_for(rf"session {s['id']}: billed a cell the daemon stopped: this cell's budget is spent", timeout=60)
    [cell] = client.call(P.Msg.COST, session=s["id"])["cells"]
    assert cell["stopped"].startswith("this cell's budget is spent: $") and 2.0 <= cell["usd"] < 3.0


def test_budgets_hold_after_a_daemon_restart(daemon_factory, make_shell):
    args = ("--simulate-gpus=H100:1", DOLLAR_A_SECOND, "--Budgets.user_per_day=0.5")
    d = daemon_factory(*args)
    ip = make_shell(d)
    result, cap = run(ip, f"%%gpu H100\n{SLOW}")
    assert not result.success and cost_of(cap)["stopped"].startswith("your budget for today is spent")
    d.kill()
    d = daemon_factory(*args)  # the same state directory: the ledger remembers today's spend
    result, cap = run(ip, "%%gpu H100\nprint('EXECUTED')")
    assert not result.success and "EXECUTED" not in cap.stdout
    assert re.match(r"your budget for today is spent: \$\d\.\d{4} of \$0\.50; nothing ran", str(result.error_in_exec))


def test_a_cell_that_ran_before_shows_its_last_run_from_the_start(daemon_factory, make_shell):
    d = daemon_factory("--simulate-gpus=H100:1", "--WorkerDaemon.progress_interval=0.2")
    ip = make_shell(d)
    cell = "%%gpu H100\nimport time\ntime.sleep(0.5)"
    assert run(ip, cell)[0].success
    result, cap = run(ip, cell)
    assert result.success
    status = [o for o in cap.outputs if "jupyter-gpu-status" in o.data.get("text/html", "")]
    text = status[0].data["text/plain"]
    assert re.fullmatch(
        r"running: H100 ×1 \(simulated\) · 0\.00 s · \$0\.0000 so far · no reading · last run: 0\.5\d s, \$0\.\d{4}",
        text,
    ), text
