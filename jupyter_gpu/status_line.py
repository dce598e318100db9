"""The live line under a running ``%%gpu`` cell: elapsed time, dollars so far, GPU
utilisation and memory; when the cell ends it keeps its final state, so a saved or
headless-run notebook records how the cell went.

An ipywidgets ``HTML`` widget where the frontend renders widgets (a notebook opened in
Jupyter Server with ipywidgets in the kernel), else a display updated in place
(``update_display_data``), which every frontend and nbclient understand.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from IPython.display import DisplayHandle, display

from jupyter_gpu.notebook import ENV_SESSION_NAME
from jupyter_gpu.output import _usd, device_label, duration, line_bundle, readings
from kernel_worker.prices import limit_text

MODES = ("auto", "widget", "html", "off")


def describe(p: dict, final: str = "") -> str:
    """``H100 ×1 · 12.3 s · $0.0102 of $2.00 · util 97% · 31.2 GiB / 80.0 GiB · last run: 42 s, $0.05``."""
    parts = [device_label(p), duration(p.get("elapsed_s", 0.0))]
    money = _usd(p.get("usd", 0.0)) + " so far" * (not final)
    if p.get("budget_usd"):
        money += f" of {limit_text(p['budget_usd'])}"
    parts += [money, *readings(p, "memory_used_bytes", "util")]
    last = p.get("estimate")
    if isinstance(last, dict) and not final:
        parts.append(f"last run: {duration(last.get('wall_s', 0.0))}, {_usd(last.get('usd', 0.0))}")
    if p.get("stopping"):
        parts.append(f"stopping: {p['stopping']}")
    return ("running: " if not final else f"{final}: ") + " · ".join(parts)


def _bundle(text: str) -> dict:
    return line_bundle(text, "jupyter-gpu-status")


def status_widgets(mode: str) -> bool:
    """Whether a widget will render here (a Jupyter Server frontend with ipywidgets)."""
    if mode == "widget":
        return True
    if mode != "auto" or not os.environ.get(ENV_SESSION_NAME):
        return False  # headless (nbclient, nbconvert): nothing would render a widget
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class StatusLine:
    """One cell's live line; shown at the first progress message, so quick cells have none."""

    def __init__(self, mode: str = "auto"):
        self.mode = mode
        self.last: dict | None = None
        self._id = f"jupyter-gpu-status-{uuid.uuid4().hex}"
        self._taken = False  # the line took over an existing display (the cell's queue line)
        self._widget: Any = None

    def take(self, display_id: str) -> None:
        """Live in the cell's existing line (its queue place): one line from the queue to the cost."""
        if self.last is None:
            self._id, self._taken = display_id, True

    def handle(self) -> DisplayHandle | None:
        """The line's display, once shown: the cost line replaces it at the cell's end."""
        return DisplayHandle(self._id) if self.last is not None or self._taken else None

    def close(self) -> None:
        """The line has been replaced (by the cost line): a widget behind it can go."""
        if self._widget is not None:
            self._widget.close()
            self._widget = None

    def update(self, progress: dict) -> None:
        if self.mode == "off":
            return
        text = describe(progress)
        if self.last is None:
            if status_widgets(self.mode):
                import ipywidgets

                self._widget = ipywidgets.HTML(_bundle(text)["text/html"])
                display(self._widget, display_id=self._id, update=self._taken)
            else:
                display(_bundle(text), raw=True, display_id=self._id, update=self._taken)
        elif self._widget is not None:
            self._widget.value = _bundle(text)["text/html"]
        else:
            display(_bundle(text), raw=True, display_id=self._id, update=True)
        self.last = progress

    def finish(self, cost: dict | None, failed: bool = False) -> None:
        """Freeze the line at the cell's end (a static display, widget or not)."""
        if self.last is None:
            return
        final = dict(self.last)
        if cost:
            final.update(elapsed_s=cost.get("wall_s", final["elapsed_s"]), usd=cost.get("usd", final["usd"]))
            if cost.get("mean_util") is not None:
                final["util"] = cost["mean_util"]
            if cost.get("peak_memory_bytes") is not None:
                final["memory_used_bytes"] = cost["peak_memory_bytes"]
            final["energy_j"] = cost.get("energy_j", final.get("energy_j"))
        display(
            _bundle(describe(final, "stopped" if failed else "finished")), raw=True, display_id=self._id, update=True
        )
        self.close()
