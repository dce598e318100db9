"""Entry point of a worker: ``python3 -m kernel_worker.worker``.

Checks first that this Python can run the executor, and says exactly what is missing
(on stderr, as a ``JUPYTER_GPU_MISSING:`` line the daemon turns into the cell's error)
instead of dying on an ImportError deep in the executor. Standard library only.
"""

import importlib.util
import os
import platform
import sys

MISSING_EXIT = 87
NEEDS = (("zmq", "pyzmq"), ("cloudpickle", "cloudpickle"))


def main() -> None:
    image = os.environ.get("JUPYTER_GPU_IMAGE", "")
    where = f"image {image!r}" if image else f"the worker Python ({sys.executable})"
    problems = []
    if sys.version_info < (3, 9):
        problems.append(f"Python 3.9 or newer (it has {platform.python_version()})")
    missing = [pkg for mod, pkg in NEEDS if importlib.util.find_spec(mod) is None]
    if missing:
        problems.append(", ".join(missing))
    if problems:
        fix = f"run `jupyter gpu image build --from {image}`" if image else "pip install pyzmq cloudpickle"
        print(
            f"JUPYTER_GPU_MISSING: {where} lacks {' and '.join(problems)}, which the jupyter-gpu executor needs: "
            f"add them to the image (python3 -m pip install pyzmq cloudpickle) or {fix}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(MISSING_EXIT)
    from kernel_worker.executor import Executor

    Executor().main()


if __name__ == "__main__":
    main()
