"""Spend reports: ``jupyter gpu cost`` (table, ``--csv``, ``--plot``) against a real daemon
with simulated GPUs, and ``%gpu cost --plot`` in a real IPython shell. The PNGs are decoded
and measured; the CSVs are read back and checked against the daemon's own SPEND answer."""

from __future__ import annotations

import base64
import csv
import datetime
import getpass
import io
import subprocess
import sys
import time
import uuid

import pytest
from PIL import Image
from support.daemons import printed
from support.shells import plain, run

from jupyter_gpu import cost_report
from jupyter_gpu.cost_plot import NOTEBOOK_PX, REPORT_PX
from jupyter_gpu.cost_report import ReportError, parse_since
from kernel_worker import protocol as P

NOW = datetime.datetime(2026, 11, 24, 15, 30).timestamp()


def test_since_is_a_duration_a_local_date_or_today():
    assert parse_since("7d", NOW) == NOW - 7 * 86400
    assert parse_since("24h", NOW) == NOW - 86400
    assert parse_since("30m", NOW) == NOW - 1800
    assert parse_since("2w", NOW) == NOW - 14 * 86400
    assert parse_since("2026-11-01", NOW) == datetime.datetime(2026, 11, 1).timestamp()
    assert parse_since("2026-11-01T09:00", NOW) == datetime.datetime(2026, 11, 1, 9).timestamp()
    assert parse_since("today", NOW) == datetime.datetime(2026, 11, 24).timestamp()
    for bad, says in [
        ("yesterday", "is not a time: give a duration back from now (7d, 24h, 30m, 2w)"),
        ("7 days", "is not a time"),
        ("0d", "is an empty window: give a duration above zero"),
        ("2027-01-01", "is in the future"),
    ]:
        with pytest.raises(ReportError, match=says.replace("(", r"\(").replace(")", r"\)")):
            parse_since(bad, NOW)


def test_a_window_of_n_days_starts_at_a_local_midnight():
    today = datetime.date(2026, 3, 30)  # the week of a daylight-saving change in much of Europe
    assert cost_report.midnight_days_ago(1, today) == datetime.datetime(2026, 3, 30).timestamp()
    assert cost_report.midnight_days_ago(14, today) == datetime.datetime(2026, 3, 17).timestamp()


def test_the_table_is_aligned_and_says_totals_budgets_and_comparison():
    reply = {
        "since": datetime.datetime(2026, 11, 17, 9, 5).timestamp(),
        "now": NOW,
        "total_usd": 12.5,
        "today_usd": 0.25,
        "days": [{"day": f"2026-11-{d}", "usd": 0.0} for d in range(17, 25)],
        "budgets": [{"scope": "you, today", "limit_usd": 5.0, "spent_usd": 0.25, "left_usd": 4.75}],
        "compare": {"cloud": 30.0},
    }
    rows = [
        {"key": "/home/a/train.ipynb", "usd": 12.0, "cells": 120, "held_s": 14460.0, "idle_s": 600.0},
        {"key": "b.ipynb", "usd": 0.5, "cells": 3, "held_s": 602.0, "idle_s": 5.0},
    ]
    assert cost_report.format_table(reply, "notebook", rows).splitlines() == [
        "GPU spend since 2026-11-17 09:05 (8 days), by notebook",
        "NOTEBOOK                  USD  CELLS     HELD   IDLE",
        "/home/a/train.ipynb  $12.0000    120  4:01:00  10:00",
        "b.ipynb               $0.5000      3    10:02   0:05",
        "total: $12.50",
        "today: $0.2500",
        "budget (you, today): $4.75 left of $5.00 (spent $0.2500)",
        "the same GPU time elsewhere: cloud $30.00",
    ]


def _cli(connection_file: str, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``jupyter gpu ARGS`` in a fresh interpreter (``prelude``: Python run before it)."""
    code = f"{prelude}\nimport sys\nfrom jupyter_gpu.cli import main\nsys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "--connection-file", connection_file, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decodes every pixel: a truncated PNG fails here
        assert im.format == "PNG"
        return im.size


@pytest.fixture
def spent(daemon_factory):
    """A daemon whose ledger holds two notebooks' cells on an H100, their sessions released."""
    d = daemon_factory("--simulate-gpus=H100:1,A100-80GB:1", "--WorkerDaemon.worker_heartbeat_interval=0.5")
    client = d.client()
    for nb, cells in (("/work/train.ipynb", 2), ("/work/eda.ipynb", 1)):
        sid = uuid.uuid4().hex
        for i in range(cells):
            printed(client, sid, f"print({i})", gpu="H100", notebook=nb)
        assert client.call(P.Msg.RELEASE, session=sid) == {"released": True}
    return d


def test_jupyter_gpu_cost_by_notebook_table_csv_and_png(spent, tmp_path):
    out_csv, out_png = tmp_path / "spend.csv", tmp_path / "spend.png"
    since = time.time() - 7 * 86400
    done = _cli(spent.connection_file, "cost", "--since", "7d", "--csv", str(out_csv), "--plot", str(out_png))
    assert done.returncode == 0, done.stderr
    truth = spent.client().call(P.Msg.SPEND, {"since": since, "by": "notebook"})

    lines = done.stdout.splitlines()
    assert lines[0].startswith("GPU spend since ") and lines[0].endswith(" (8 days), by notebook")
    assert lines[1].split() == ["NOTEBOOK", "USD", "CELLS", "HELD", "IDLE"]
    assert [line.split()[0] for line in lines[2:4]] == [r["key"] for r in truth["rows"]]
    assert {line.split()[2] for line in lines[2:4]} == {"1", "2"}
    assert len({len(line) for line in lines[1:4]}) == 1  # right-aligned numbers: every line as long
    assert f"wrote {out_csv}" in lines and f"wrote {out_png} ({REPORT_PX[0]}×{REPORT_PX[1]} px)" in lines

    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["notebook", "usd", "cells", "held_s", "idle_s"]
    assert {r["notebook"]: int(r["cells"]) for r in table} == {"/work/train.ipynb": 2, "/work/eda.ipynb": 1}
    for row, want in zip(table, truth["rows"]):
        assert row["notebook"] == want["key"]
        assert float(row["usd"]) == pytest.approx(want["usd"], abs=1e-6) and float(row["usd"]) > 0
        assert float(row["held_s"]) == pytest.approx(want["held_s"], abs=1e-3)
    assert _png_size(out_png.read_bytes()) == REPORT_PX


def test_jupyter_gpu_cost_by_day_user_and_gpu(spent, tmp_path):
    out_csv, out_png = tmp_path / "days.csv", tmp_path / "days.png"
    done = _cli(
        spent.connection_file, "cost", "--since", "14d", "--by", "day", "--csv", str(out_csv), "--plot", str(out_png)
    )
    assert done.returncode == 0, done.stderr
    with open(out_csv, newline="") as f:
        days = list(csv.DictReader(f))
    today = datetime.date.today()
    # Every day of the window, zero-filled, ascending: 14 days back and today.
    assert [r["day"] for r in days] == [(today - datetime.timedelta(days=n)).isoformat() for n in range(14, -1, -1)]
    assert all(float(r["usd"]) == 0 for r in days[:-1]) and float(days[-1]["usd"]) > 0
    assert _png_size(out_png.read_bytes()) == REPORT_PX

    for by, key in (("user", getpass.getuser()), ("gpu", "H100")):
        out = tmp_path / f"{by}.csv"
        done = _cli(spent.connection_file, "cost", "--by", by, "--all", "--csv", str(out))
        assert done.returncode == 0, done.stderr
        with open(out, newline="") as f:
            [row] = list(csv.DictReader(f))
        assert row[by] == key and int(row["cells"]) == 3 and float(row["usd"]) > 0


def test_jupyter_gpu_cost_errors_say_what_to_do(spent, tmp_path):
    cf = spent.connection_file
    for args, says in [
        (["--since", "last week"], "jupyter gpu cost: --since 'last week' is not a time: give a duration"),
        (["--plot", str(tmp_path / "x.jpg")], "jupyter gpu cost: --plot writes a PNG image: name the file FILE.png"),
        (["--csv", str(tmp_path / "no" / "x.csv")], "jupyter gpu cost: cannot write the CSV file"),
    ]:
        done = _cli(cf, "cost", *args)
        assert done.returncode == 1 and done.stderr.startswith(says), done.stderr
        assert "Traceback" not in done.stderr
    done = _cli(cf, "cost", "--by", "week")
    assert done.returncode == 2 and "invalid choice: 'week' (choose from" in done.stderr

    # Without matplotlib: the extra to install, said before the daemon is even asked.
    no_mpl = "import sys; sys.modules['matplotlib'] = None"
    done = _cli(cf, "cost", "--plot", str(tmp_path / "x.png"), prelude=no_mpl)
    assert done.returncode == 1 and done.stdout == ""
    assert "pip install 'jupyter-gpu[plot]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_gpu_cost_plot_draws_this_notebooks_cells_and_days(daemon_factory, make_shell, monkeypatch, tmp_path):
    d = daemon_factory("--simulate-gpus=H100:1", "--WorkerDaemon.worker_heartbeat_interval=0.5")
    nb = tmp_path / "plots.ipynb"
    nb.write_text("{}")
    monkeypatch.setenv("JPY_SESSION_NAME", str(nb))
    ip = make_shell(d)
    for code in ("x = 1", "x += 1", "print(x)"):
        assert run(ip, f"%%gpu H100\n{code}")[0].success

    result, cap = run(ip, "%gpu cost --plot")
    assert result.success, cap.stderr
    assert "cells: 3, $" in cap.stdout  # the text report comes first, as without --plot
    [png] = [o.data["image/png"] for o in cap.outputs if "image/png" in o.data]
    data = base64.b64decode(png) if isinstance(png, str) else png
    assert _png_size(data) == NOTEBOOK_PX

    result, cap = run(ip, "%gpu cost --plots")
    assert not result.success
    assert "usage: %gpu cost [--plot]; unknown option '--plots'" in plain(cap.stdout + cap.stderr)
