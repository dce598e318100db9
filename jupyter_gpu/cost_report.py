"""Spend reports from the daemon's SPEND answer: ``jupyter gpu cost`` on the host (an
aligned table, ``--csv FILE``, ``--plot FILE.png``) and ``%gpu cost --plot`` in a notebook.

The daemon does the accounting; this module only reads its answer: ``rows`` (one per key
of ``by``), ``days`` (every day of the window, zero-filled), ``today_usd``, ``budgets`` and
``compare``. Drawing is in ``cost_plot`` (matplotlib, the ``plot`` extra), imported only
when a plot is asked for.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import time
from typing import Any, Callable

BY = ("notebook", "user", "gpu", "day")
PLOT_DAYS = 14  # the days `%gpu cost --plot` and the sidebar show, today included
CSV_FIELDS = ("usd", "cells", "held_s", "idle_s")
UNITS = {"w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
SINCE_HELP = (
    "a duration back from now (7d, 24h, 30m, 2w), a local date or time (2026-11-01, 2026-11-01T09:00), or today"
)


class ReportError(Exception):
    """A report that cannot be made, with what to do about it; shown as one line."""

    def _render_traceback_(self) -> list[str]:  # IPython: the message, not a traceback
        return [f"\x1b[0;31mCostReportError\x1b[0m: {self}"]


def midnight_days_ago(days: int, today: datetime.date | None = None) -> float:
    """Unix time of the local midnight that starts a window of ``days`` days ending today
    (1: today's midnight). By calendar, so a daylight-saving change moves nothing."""
    start = (today or datetime.date.today()) - datetime.timedelta(days=days - 1)
    return datetime.datetime.combine(start, datetime.time()).timestamp()


def parse_since(text: str, now: float | None = None) -> float:
    """``--since`` as unix seconds: ``7d``, ``24h``, ``30m``, ``90s``, ``2w`` back from now;
    an ISO date or date-time in local time (``2026-11-01``, ``2026-11-01T09:00``); ``today``."""
    now = time.time() if now is None else now
    text = text.strip()
    if text.lower() == "today":
        return midnight_days_ago(1, datetime.date.fromtimestamp(now))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([wdhms])", text.lower())
    if m:
        amount = float(m[1])
        if amount <= 0:
            raise ReportError(f"--since {text!r} is an empty window: give a duration above zero, e.g. 7d")
        return now - amount * UNITS[m[2]]
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"--since {text[:40]!r} is not a time: give {SINCE_HELP}") from None
    since = when.timestamp()  # a naive date-time is local time, as the daemon's days are
    if since > now:
        raise ReportError(f"--since {text!r} is in the future: nothing has been spent after now")
    return since


def report_rows(reply: dict, by: str) -> list[dict]:
    """The answer's rows for ``by``: ``{"key", "usd", "cells", "held_s", "idle_s"}``; by day,
    one for every day of the window (the answer's zero-filled ``days``), oldest first."""
    rows = reply.get("rows")
    if isinstance(rows, list) and by == "day":
        spent = {r["key"]: r for r in rows}
        zero = {"usd": 0.0, "cells": 0, "held_s": 0.0, "idle_s": 0.0}
        return [spent.get(d["day"], {**zero, "key": d["day"]}) for d in reply["days"]]
    if isinstance(rows, list):
        return rows
    # A daemon from before `by`: what its answer has (per notebook, per day) still reports.
    if by == "notebook":
        return [
            {"key": n["notebook"], "usd": n["usd"], "cells": n["cells"], "held_s": n["held_s"], "idle_s": 0.0}
            for n in reply.get("notebooks", [])
        ]
    if by == "day":
        return [{"key": d["day"], "usd": d["usd"], "cells": 0, "held_s": 0.0, "idle_s": 0.0} for d in reply["days"]]
    raise ReportError(
        f"the daemon does not report spend by {by}: it runs an older jupyter-gpu. "
        "Upgrade jupyter-gpu on the GPU host, or use --by notebook or --by day"
    )


def usd(x: float) -> str:
    return f"${x:.4f}" if x < 1 else f"${x:,.2f}"


def duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    s = max(0, round(seconds))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def window_text(reply: dict) -> str:
    """``since 2026-11-17 09:05 (8 days)``: the calendar days the window touches, today included."""
    since = datetime.datetime.fromtimestamp(reply["since"])
    n = (datetime.date.fromtimestamp(reply["now"]) - since.date()).days + 1
    return f"since {since:%Y-%m-%d %H:%M} ({n} day{'' if n == 1 else 's'})"


def budget_lines(reply: dict) -> list[str]:
    return [
        f"budget ({b['scope']}): {usd(b['left_usd'])} left of {usd(b['limit_usd'])} (spent {usd(b['spent_usd'])})"
        for b in reply.get("budgets") or []
    ]


def format_table(reply: dict, by: str, rows: list[dict]) -> str:
    """The aligned table ``jupyter gpu cost`` prints, then the totals, budgets and comparison."""
    header = (by.upper(), "USD", "CELLS", "HELD", "IDLE")
    body = [
        (str(r["key"]), f"${r['usd']:,.4f}", str(r["cells"]), duration(r["held_s"]), duration(r["idle_s"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"GPU spend {window_text(reply)}, by {by}", line(header)]
    out += [line(b) for b in body] or ["(nothing spent in this window)"]
    out.append(f"total: {usd(reply['total_usd'])}")
    if "today_usd" in reply:
        out.append(f"today: {usd(reply['today_usd'])}")
    out += budget_lines(reply)
    compare = reply.get("compare") or {}
    if compare:
        out.append("the same GPU time elsewhere: " + ", ".join(f"{k} {usd(v)}" for k, v in compare.items()))
    return "\n".join(out)


def write_csv(path: str, by: str, rows: list[dict]) -> None:
    """One line per row: the key, then dollars and seconds unrounded enough to add up."""
    try:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow((by, *CSV_FIELDS))
            for r in rows:
                w.writerow((r["key"], f"{r['usd']:.6f}", int(r["cells"]), f"{r['held_s']:.3f}", f"{r['idle_s']:.3f}"))
    except OSError as e:
        raise ReportError(f"cannot write the CSV file {path}: {e.strerror}; give --csv a path you can write") from None


def _write_png(path: str, png: bytes, flag: str) -> None:
    try:
        with open(path, "wb") as f:
            f.write(png)
    except OSError as e:
        raise ReportError(f"cannot write the PNG file {path}: {e.strerror}; give {flag} a path you can write") from None


def run_cli(args: argparse.Namespace, call: Callable[[dict], dict]) -> int:
    """``jupyter gpu cost``; ``call`` sends a SPEND request and returns its answer."""
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ReportError(f"--plot writes a PNG image: name the file FILE.png, not {args.plot!r}")
    since = parse_since(args.since)
    if args.plot:
        from jupyter_gpu import cost_plot

        cost_plot.require()  # before asking the daemon: say what to install first
    reply = call({"since": since, "all": args.all, "by": args.by})
    rows = report_rows(reply, args.by)
    print(format_table(reply, args.by, rows))
    if args.csv:
        write_csv(args.csv, args.by, rows)
        print(f"wrote {args.csv}")
    if args.plot:
        from jupyter_gpu import cost_plot

        _write_png(args.plot, cost_plot.report_png(rows, args.by, f"GPU spend {window_text(reply)}"), "--plot")
        print(f"wrote {args.plot} ({cost_plot.REPORT_PX[0]}×{cost_plot.REPORT_PX[1]} px)")
    return 0


def add_cli(sub: Any) -> None:
    """The ``cost`` subcommand's arguments (``sub``: argparse's subparsers)."""
    c = sub.add_parser("cost", help="GPU spend over a window, by notebook, user, GPU or day; CSV and PNG export")
    c.add_argument("--since", default="7d", help=f"start of the window: {SINCE_HELP} (default 7d)")
    c.add_argument("--by", choices=BY, default="notebook", help="one row per notebook, user, GPU model or day")
    c.add_argument("--all", action="store_true", help="everyone's spend (operators only)")
    c.add_argument("--csv", default="", metavar="FILE", help="also write the rows as CSV to FILE")
    c.add_argument("--plot", default="", metavar="FILE.png", help="also draw the rows as a bar chart (needs [plot])")


def notebook_plot(rest: str, summary: dict, spend: Callable[[dict], dict], notebook: str) -> None:
    """``%gpu cost --plot``: this notebook's spend per cell (this session's cells, from the
    COST answer ``summary``) and per day over the last PLOT_DAYS days, as one inline PNG."""
    if rest.split() != ["--plot"]:
        raise ReportError(f"usage: %gpu cost [--plot]; unknown option {rest[:40]!r}")
    from IPython.display import Image, display

    from jupyter_gpu import cost_plot

    cost_plot.require()
    # A daemon that can filter by notebook echoes the notebook it filtered by.
    reply = spend({"since": midnight_days_ago(PLOT_DAYS), "by": "day", "notebook": notebook})
    mine = bool(notebook) and reply.get("notebook") == notebook
    days = (
        [(r["key"], r["usd"]) for r in report_rows(reply, "day")]
        if mine
        else [(d["day"], d["usd"]) for d in reply["days"]]
    )
    cells = [(c["usd"], c["wall_s"]) for c in summary["cells"] if c.get("kind", "cell") == "cell"]
    who = "this notebook" if mine else "all your notebooks"
    display(Image(data=cost_plot.notebook_png(cells, days, who), format="png"))
