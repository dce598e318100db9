"""Print an executed notebook's cells and what they showed, cost lines included, then
what the cells cost: each cost line, the status line of a cell that ran before (its last
run), and why a cell was stopped.

    python examples/show_outputs.py EXECUTED.ipynb
"""

import re
import sys

import nbformat

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cost_line(cell) -> str:
    """The cell's cost line, or ""."""
    for out in cell.get("outputs", []):
        if "cost" in out.get("metadata", {}).get("jupyter_gpu", {}):
            return out.data["text/plain"]
    return ""


def live(cell) -> list[str]:
    """What the cell's status line said while it ran (kept by run_headless.py)."""
    return list(cell.metadata.get("jupyter_gpu_demo", {}).get("live", []))


def show_cell(cell) -> None:
    print("\n".join("In  | " + line for line in cell.source.splitlines()))
    if live(cell):  # replaced by the cost line at the cell's end: as it read last
        print("Live| " + live(cell)[-1])
    for out in cell.outputs:
        if out.output_type == "stream":
            text = out.text.replace("\r", "\n")
        elif out.output_type == "error":
            text = "\n".join(out.traceback)
        else:
            data = out.get("data", {})
            text = "[image/png]" if "image/png" in data else data.get("text/plain", "")
        for line in ANSI.sub("", text).splitlines():
            print("Out | " + line)
    print()


def summary(cells) -> None:
    print("=" * 100)
    print("What the cells cost (a simulated H100 at $2.99 an hour: the dollars are what that time would cost)")
    for cell in cells:
        line, seen = cost_line(cell), live(cell)
        if not line:
            continue
        label = f"[{cell.execution_count}]"
        print(f"{label:>5} {line}")
        estimate = [t for t in seen if "last run: " in t]
        if estimate:
            print(f"{'':>5}   ran before; while it ran, its status line said: {estimate[-1]}")
    print("=" * 100)


def main(path: str) -> None:
    nb = nbformat.read(path, 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        show_cell(cell)
    summary(code)
    print(f"The executed notebook: {path}")


if __name__ == "__main__":
    main(sys.argv[1])
