"""Print an executed notebook's cells and what they showed, cost lines included."""

import re
import sys

import nbformat


def main(path: str) -> None:
    nb = nbformat.read(path, 4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print("\n".join("In  | " + line for line in cell.source.splitlines()))
        for out in cell.outputs:
            if out.output_type == "stream":
                text = out.text.replace("\r", "\n")
            elif out.output_type == "error":
                text = "\n".join(out.traceback)
            else:
                data = out.get("data", {})
                text = "[image/png]" if "image/png" in data else data.get("text/plain", "")
            for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
                print("Out | " + line)
        print()


if __name__ == "__main__":
    main(sys.argv[1])
