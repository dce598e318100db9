"""Bar charts of spend as PNG bytes, drawn with matplotlib's Agg canvas on a Figure of its
own: pyplot is never imported, so a notebook's own matplotlib backend and figures are left
alone. matplotlib is the optional ``plot`` extra (``pip install 'jupyter-gpu[plot]'``).

Sizes are fixed, in inches at ``DPI``: a report PNG is exactly ``REPORT_PX`` pixels, the
notebook's exactly ``NOTEBOOK_PX``.
"""

from __future__ import annotations

import datetime
import io
import os
from typing import Any

from jupyter_gpu.cost_report import ReportError, usd

DPI = 100
REPORT_INCHES = (8.0, 4.5)
NOTEBOOK_INCHES = (10.0, 3.5)
REPORT_PX = (round(REPORT_INCHES[0] * DPI), round(REPORT_INCHES[1] * DPI))
NOTEBOOK_PX = (round(NOTEBOOK_INCHES[0] * DPI), round(NOTEBOOK_INCHES[1] * DPI))
MAX_BARS = 25  # per-key charts: the top ones, then one bar for the rest
BAR = "#1976d2"  # JupyterLab's --jp-brand-color1 (light theme)
MISSING = (
    "plots need matplotlib, which jupyter-gpu installs only with its plot extra: "
    "pip install 'jupyter-gpu[plot]' (or pip install matplotlib), then try again"
)


def require() -> None:
    """Raise ReportError naming the extra when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(MISSING) from None


def _figure(inches: tuple[float, float]) -> Any:
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=inches, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays exact
    return buf.getvalue()


def _label(key: str, by: str) -> str:
    if by == "notebook":
        return os.path.basename(key.rstrip("/")) or key
    return key


def _day_label(day: str) -> str:
    try:
        return datetime.date.fromisoformat(day).strftime("%b %d")
    except ValueError:
        return day


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    cents = ax.get_ylim()[1] >= 1  # one precision per axis: $0.80 beside $1.20, $0.0025 beside $0.0100
    ax.yaxis.set_major_formatter(lambda v, _: f"${v:,.2f}" if cents else f"${v:.4f}")
    ax.tick_params(labelsize=8)


def report_png(rows: list[dict], by: str, title: str) -> bytes:
    """``jupyter gpu cost --plot``: one bar per day (in order), or per key (largest first,
    the smallest lumped together past MAX_BARS)."""
    fig = _figure(REPORT_INCHES)
    ax = fig.subplots()
    if by == "day":
        labels = [_day_label(str(r["key"])) for r in rows]
        values = [r["usd"] for r in rows]
    else:
        top = rows[:MAX_BARS] if len(rows) <= MAX_BARS else rows[: MAX_BARS - 1]
        labels = [_label(str(r["key"]), by) for r in top]
        values = [r["usd"] for r in top]
        if len(rows) > len(top):
            labels.append(f"({len(rows) - len(top)} more)")
            values.append(sum(r["usd"] for r in rows[len(top) :]))
    ax.bar(range(len(values)), values, color=BAR)
    crowded = len(values) > 7  # slanted labels, so that they do not overlap
    ax.set_xticks(range(len(values)), labels, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    ax.set_title(f"{title}, by {by}: {usd(sum(r['usd'] for r in rows))}", fontsize=10)
    if not values:
        ax.text(0.5, 0.5, "nothing spent in this window", ha="center", va="center", transform=ax.transAxes)
    _style(ax)
    return _png(fig)


def notebook_png(cells: list[tuple[float, float]], days: list[tuple[str, float]], who: str) -> bytes:
    """``%gpu cost --plot``: this session's cells ((usd, wall seconds), in order) beside the
    spend per day of ``who`` (("YYYY-MM-DD", usd), ascending)."""
    fig = _figure(NOTEBOOK_INCHES)
    per_cell, per_day = fig.subplots(1, 2, width_ratios=[1, 1.3])
    numbers = range(1, len(cells) + 1)
    per_cell.bar(numbers, [c[0] for c in cells], color=BAR)
    per_cell.set_xlabel("cell", fontsize=8)
    per_cell.set_title(f"this session, per cell: {usd(sum(c[0] for c in cells))}", fontsize=10)
    if cells:
        per_cell.set_xticks(list(numbers)[:: max(1, len(cells) // 10)])
    else:
        per_cell.text(0.5, 0.5, "no cells yet", ha="center", va="center", transform=per_cell.transAxes)
    per_day.bar(range(len(days)), [d[1] for d in days], color=BAR)
    per_day.set_xticks(range(len(days)), [_day_label(d[0]) for d in days], rotation=45, ha="right")
    per_day.set_title(f"{who}, per day: {usd(sum(d[1] for d in days))}", fontsize=10)
    for ax in (per_cell, per_day):
        _style(ax)
    return _png(fig)
