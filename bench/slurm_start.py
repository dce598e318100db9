"""Cold start, and a snapshot's way out and back, through Slurm beside the process backend,
in the same run (#15).

    python bench/slurm_start.py [--reps N] [--snapshot-mib M]

Starts the tests' real one-node Slurm (tests/support/slurm.py: munged, slurmctld, slurmd
on loopback, two declared H100s), a daemon with ``--backend slurm`` in front of it and a
daemon with the process backend and a simulated H100, then alternates: a new session's
first cell (``print``) on each, timed from sending the EXECUTE to its first output, then
a release. The Slurm row adds sbatch, Slurm's scheduling pass, slurmd's job launch and
the executor's CURVE tcp dial-back.

Then, per backend, one session holding ``M`` MiB of arrays alternates ``%gpu snapshot``
(the namespace written; through Slurm, on the node, then sent over the worker's CURVE
socket into the daemon's store) and ``%gpu restore ID`` into the same idle worker (the
files back to the node, then loaded). The process backend writes and reads the store
directly. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from figures import ms, pct, print_table  # noqa: E402
from support.daemons import start_daemon  # noqa: E402
from support.orphans import stop_workers  # noqa: E402
from support.slurm import slurm_cluster  # noqa: E402

from kernel_worker import protocol as P  # noqa: E402

SLURM_ARGS = (
    "--backend=slurm",
    "--SlurmBackend.partition=gpu",
    "--SlurmBackend.poll_interval=0.05",
    "--SlurmBackend.gres_types={'H100': 'h100'}",
)


def first_output(daemon, session: str) -> float:
    """Seconds from a new session's EXECUTE to its first printed line; then released."""
    client = daemon.client(heartbeat_interval=5, heartbeat_timeout=120)
    first: list[float] = []

    def on_message(m: P.Message) -> None:
        if m.type == P.Msg.STREAM and not first:
            first.append(time.perf_counter())

    t = time.perf_counter()
    done = client.request(P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "print('up')"}, session), on_message)
    assert done.content.get("ok"), done.content
    client.call(P.Msg.RELEASE, session=session, timeout=120)
    return first[0] - t


def snapshot_round(daemon, session: str, mib: int, reps: int) -> tuple[list[float], list[float]]:
    """Seconds of each snapshot and each restore of an ``mib`` MiB namespace, alternated."""
    client = daemon.client(heartbeat_interval=5, heartbeat_timeout=300)
    code = f"import numpy as np\narrays = [np.full(16 * 1024 * 1024 // 8, float(i)) for i in range({mib // 16})]"
    assert client.request(P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": code}, session)).content.get("ok")
    took, restored = [], []
    for _ in range(reps):
        snap = client.call(P.Msg.SNAPSHOT, {"op": "take", "notebook": "bench.ipynb"}, session, timeout=300)
        took.append(snap["seconds"])
        back = client.call(P.Msg.SNAPSHOT, {"op": "restore", "id": snap["id"]}, session, timeout=300)
        assert not back.get("failed"), back
        restored.append(back["seconds"])
    client.call(P.Msg.RELEASE, session=session, timeout=120)
    return took, restored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--snapshot-mib", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="jgpu-bench-slurm-") as tmp:
        root = Path(tmp)
        with slurm_cluster(root, gpus={"h100": 2}) as slurm:
            os.environ["SLURM_CONF"] = str(slurm.conf)
            (root / "gateway").mkdir()
            (root / "process").mkdir()
            gateway = start_daemon(root / "gateway", *SLURM_ARGS)
            local = start_daemon(root / "process", "--simulate-gpus=H100:2")
            times: dict[str, list[float]] = {"slurm": [], "process": []}
            try:
                for i in range(args.reps):
                    times["slurm"].append(first_output(gateway, f"bench-slurm-{i}"))
                    times["process"].append(first_output(local, f"bench-process-{i}"))
                snaps = {
                    name: snapshot_round(d, f"bench-snap-{name}", args.snapshot_mib, args.reps)
                    for name, d in (("slurm", gateway), ("process", local))
                }
            finally:
                for d in (gateway, local):
                    d.stop()
                    stop_workers(d.connection_file)
    rows = [
        (f"{name} backend", ms(statistics.median(xs)), ms(pct(xs, 100)), ms(pct(xs, 0)))
        for name, xs in (
            ("slurm (sbatch → compute node → CURVE dial-back)", times["slurm"]),
            ("process", times["process"]),
        )
    ]
    print(f"cold start, EXECUTE of a new session to its first output, {args.reps} alternated reps\n")
    print_table(("path", "median", "max", "min"), rows)
    mb = args.snapshot_mib * 1024**2 / 1e6
    rows = [
        (f"{name}: {what}", ms(statistics.median(xs)), f"{mb / statistics.median(xs) / 1e3:.2f} GB/s", ms(max(xs)))
        for name, took, back in (
            ("slurm", "written on the node, sent over its CURVE socket", "sent to the node, then loaded"),
            ("process", "written into the store", "read from the store (large values when first read)"),
        )
        for what, xs in zip((f"snapshot, {took}", f"restore, {back}"), snaps[name])
    ]
    print(f"\n{args.snapshot_mib} MiB namespace, %gpu snapshot then %gpu restore ID, {args.reps} reps each\n")
    print_table(("path", "median", "rate", "max"), rows)


if __name__ == "__main__":
    main()
