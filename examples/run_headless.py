"""Run a notebook headless, as `make demo` does, and keep what its status lines said.

nbclient executes the notebook in its own directory, as `jupyter nbconvert --execute`
would. A `%%gpu` cell's live status line (`running: H100 ×1 (simulated) · 1.00 s ·
$0.0008 so far · last run: ...`) is replaced by the cell's cost line when the cell ends,
so a saved notebook keeps only the cost line; the texts the status line showed while the
cell ran are kept in that cell's metadata, under ``jupyter_gpu_demo.live``, for
show_outputs.py to print.

    python examples/run_headless.py NOTEBOOK OUTPUT
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

STATUS_CLASS = "jupyter-gpu-status"  # the status line's html class (jupyter_gpu/status_line.py)
CELL_TIMEOUT = 120


class KeepStatusLines(NotebookClient):
    def process_message(self, msg, cell, cell_index):
        data = msg["content"].get("data") or {}
        text = data.get("text/plain", "")
        if STATUS_CLASS in data.get("text/html", "") and text.startswith("running: "):
            cell.metadata.setdefault("jupyter_gpu_demo", {}).setdefault("live", []).append(text)
        return super().process_message(msg, cell, cell_index)


def main(source: str, output: str) -> None:
    nb = nbformat.read(source, 4)
    client = KeepStatusLines(
        nb,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(Path(source).resolve().parent)}},
    )
    try:
        client.execute()
    finally:  # a failed run is saved too, up to the cell that failed
        nbformat.write(nb, output)


if __name__ == "__main__":
    main(*sys.argv[1:])
