"""Running cells in a real IPython InteractiveShell and reading what they showed."""

from __future__ import annotations

import re


def run(ip, cell: str):
    """Run a cell and capture what it showed (stdout, stderr, rich outputs)."""
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        result = ip.run_cell(cell, store_history=True)
    return result, cap


def plain(text: str) -> str:
    """``text`` without ANSI colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def notes(cap) -> list[str]:
    """What jupyter-gpu said about the cell, from its cost line (or its one notes line)."""
    return [n for o in cap.outputs for n in ((o.metadata or {}).get("jupyter_gpu") or {}).get("notes", [])]


def cost_of(cap) -> dict:  # noqa: ANN001
    """The figures of a cell's cost line (its metadata), and the line as shown."""
    [line] = [o for o in cap.outputs if "⏱" in o.data.get("text/plain", "")]
    return line.metadata["jupyter_gpu"]["cost"] | {"line": line.data["text/plain"]}
