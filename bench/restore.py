"""Scale to zero, measured end to end: the first cell after a 1 GiB namespace was
snapshotted and its worker released, when that cell reads one small name (lazy restore),
beside a cold start of the same cell with nothing to restore, alternated in the same run.

    python bench/restore.py [--reps N] [--gib G]

Rows:
- first cell after release --keep: EXECUTE until DONE, a new worker started and the
  snapshot restored (small names at once, the large arrays left on disk until read);
- cold start, nothing to restore: the same cell on a new notebook (reference);
- their difference (target: under 100 ms);
- the release --keep itself: the snapshot written (1 GiB) and the worker stopped.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from figures import ms, print_table  # noqa: E402
from support.daemons import start_daemon  # noqa: E402
from support.orphans import stop_workers  # noqa: E402

from jupyter_gpu.client import DaemonClient  # noqa: E402
from kernel_worker import protocol as P  # noqa: E402

ARRAY_MIB = 128


def build(gib: float) -> str:
    n = max(1, int(gib * 1024 / ARRAY_MIB))
    return (
        "import numpy as np\n"
        f"arrays = [np.full({ARRAY_MIB} * 1024 * 1024 // 8, float(i)) for i in range({n})]\n"
        "small = 41\n"
    )


def cell(client: DaemonClient, session: str, notebook: str, code: str) -> tuple[float, dict]:
    started: dict = {}

    def on_message(m: P.Message) -> None:
        if m.type == P.Msg.STARTED:
            started.update(m.content)

    content = {"gpu": "cpu", "code": code, "notebook": notebook}
    t0 = time.perf_counter()
    done = client.request(P.Message(P.Msg.EXECUTE, content, session), on_message, timeout=600)
    assert done.content.get("ok"), done.content
    return time.perf_counter() - t0, started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gib", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="jgpu-restore-") as tmp:
        d = start_daemon(Path(tmp))
        client = DaemonClient(d.url, d.key, heartbeat_interval=5, heartbeat_timeout=120)
        after, cold, keep = [], [], []
        try:
            for i in range(args.reps):
                cell(client, f"nb{i}", f"big-{i}.ipynb", build(args.gib))
                t0 = time.perf_counter()
                client.call(P.Msg.RELEASE, {"keep": True}, session=f"nb{i}", timeout=600)
                keep.append(time.perf_counter() - t0)
                first, info = cell(client, f"nb{i}", f"big-{i}.ipynb", "x = small + 1")
                restored = info.get("restored") or {}
                assert restored.get("lazy"), restored  # the arrays stayed on disk
                after.append(first)
                cold.append(cell(client, f"cold{i}", f"cold-{i}.ipynb", "x = 1")[0])
                for s in (f"nb{i}", f"cold{i}"):
                    client.call(P.Msg.RELEASE, {}, session=s, timeout=60)
        finally:
            client.close()
            d.stop()
            stop_workers(d.connection_file)
    med = statistics.median
    print(f"First cell after a {args.gib:g} GiB namespace was snapshotted (process backend, median of {args.reps})")
    print_table(
        ("", "jupyter-gpu", "reference"),
        [
            ("first cell after release --keep, reads one small name", ms(med(after)), ms(med(cold)) + " (cold start)"),
            ("difference (target < 100 ms)", ms(med(after) - med(cold)), ""),
            (f"release --keep: {args.gib:g} GiB written, worker stopped", ms(med(keep)), ""),
        ],
    )


if __name__ == "__main__":
    main()
