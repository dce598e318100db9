"""Nothing lost, measured: a daemon restarted mid-cell, and `%gpu attach` replaying
buffered output, beside references measured in the same run.

    python bench/restart.py [--reps N] [--attach-mb MB]

Rows:
- daemon restart mid-cell: from the new daemon's process start until the running cell's
  output reaches the notebook's client again (process backend), beside the same daemon's
  bare start (process start until its ready line) in the same run;
- attach: from sending ATTACH until MB of buffered output has been received, beside the
  same bytes in the same number of messages through a raw pyzmq DEALER/ROUTER pair.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from figures import print_table  # noqa: E402
from support.daemons import start_daemon  # noqa: E402
from support.orphans import stop_workers  # noqa: E402

from jupyter_gpu.client import DaemonClient  # noqa: E402
from kernel_worker import protocol as P  # noqa: E402

LINE = "x" * 1000 + "\n"  # one 1 kB line of output


SESSION = "bench-restart"


def restart_once(tmp: Path, *args: str) -> tuple[float, float]:
    """(new daemon start -> output flowing again, new daemon start -> ready) in seconds."""
    d = start_daemon(tmp, *args)
    go = tmp / "bulk" / SESSION / "go"  # the session's bulk directory: host and container both see it
    client = DaemonClient(d.url, d.key, heartbeat_interval=5, heartbeat_timeout=60)
    arrivals: list[float] = []
    restart: dict = {}
    code = (
        "import os, time\nn = 0\ngo = os.path.join(os.environ['JUPYTER_GPU_BULK_DIR'], 'go')\n"
        "while not os.path.exists(go):\n    n += 1; print(n, flush=True); time.sleep(0.002)\n"
    )

    def on_message(m: P.Message) -> None:
        if m.type == P.Msg.STREAM:
            arrivals.append(time.perf_counter())
            if len(arrivals) == 20:  # running: kill its daemon, start another
                threading.Thread(target=kill_and_start, daemon=True).start()
            if "ready" in restart and arrivals[-1] > restart["ready"] and "flowing" not in restart:
                restart["flowing"] = arrivals[-1]
                go.touch()

    def kill_and_start() -> None:
        d.kill()
        restart["spawned"] = time.perf_counter()
        restart["daemon"] = start_daemon(tmp, *args)
        restart["ready"] = time.perf_counter()

    try:
        client.request(P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": code}, SESSION), on_message)
        return restart["flowing"] - restart["spawned"], restart["ready"] - restart["spawned"]
    finally:
        client.close()
        for daemon in (restart.get("daemon"), d):
            if daemon is not None:
                daemon.stop()
        stop_workers(d.connection_file)
        go.unlink(missing_ok=True)


def attach_once(tmp: Path, mb: int) -> float:
    """Seconds from ATTACH to the last byte of ``mb`` MB of a finished cell's output."""
    d = start_daemon(tmp, f"--WorkerDaemon.output_memory_bytes={64 * 1024**2}")
    first, second = DaemonClient(d.url, d.key), DaemonClient(d.url, d.key)
    try:
        code = f"for i in range({mb * 1024}): print({LINE!r}, end='')"
        first.request(P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": code}, "bench-attach"), timeout=300)
        got = [0]

        def on_message(m: P.Message) -> None:
            if m.type == P.Msg.STREAM:
                got[0] += len(m.content["text"])

        t = time.perf_counter()
        second.request(P.Message(P.Msg.ATTACH, {"session": "bench-attach"}, "bench-attacher"), on_message, timeout=300)
        took = time.perf_counter() - t
        assert got[0] == mb * 1024 * len(LINE), got
        return took
    finally:
        first.close()
        second.close()
        d.stop()


def pyzmq_once(tmp: Path, mb: int, messages: int) -> float:
    """The same bytes in the same number of messages, ROUTER to DEALER over ipc."""
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    url = f"ipc://{tmp}/raw.sock"
    router.bind(url)
    dealer.connect(url)
    dealer.send(b"hello")
    ident, _ = router.recv_multipart()
    chunk = b"x" * (mb * 1024 * len(LINE) // messages)
    t = time.perf_counter()
    for _ in range(messages):
        router.send_multipart([ident, chunk])
    for _ in range(messages):
        dealer.recv()
    took = time.perf_counter() - t
    router.close(0)
    dealer.close(0)
    return took


def backends(no_docker: bool):
    """(name, a function giving the daemon's options) for each backend measured; the
    docker engine (the tests' own) runs while its row is measured."""
    yield "process", lambda: ()
    from support import dockerd
    from support.daemons import docker_args
    from support.logs import LogWatcher

    if no_docker or not dockerd.ROOTFS_TAR.exists():
        print("# docker row skipped (--no-docker, or no test image: make test-image)", file=sys.stderr)
        return
    engine = dockerd.start_engine(LogWatcher)
    try:
        dockerd.ensure_images(engine.client, engine.url)
        yield "docker", lambda: docker_args(engine, notebook_libs=False)
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--attach-mb", type=int, default=10)
    ap.add_argument("--no-docker", action="store_true", help="skip the docker backend row")
    args = ap.parse_args()
    med = statistics.median
    restarts: dict[str, tuple[list, list]] = {}
    with tempfile.TemporaryDirectory(prefix="jgpu-bench-restart-") as tmp:
        attaches, raws = [], []
        for backend, daemon_args in backends(args.no_docker):
            flows, readies = restarts.setdefault(backend, ([], []))
            for i in range(args.reps):
                run_dir = Path(tmp) / f"{backend}{i}"
                run_dir.mkdir()
                flow, ready = restart_once(run_dir, *daemon_args())
                flows.append(flow)
                readies.append(ready)
                if backend == "process":
                    attaches.append(attach_once(run_dir, args.attach_mb))
                    # the stream arrives batched: about one message per flush (5 ms) of output
                    raws.append(pyzmq_once(run_dir, args.attach_mb, max(1, args.attach_mb * 20)))
    rows = [("metric", "jupyter-gpu", "reference, same run", "target")]
    for backend, (flows, readies) in restarts.items():
        rows.append(
            (
                f"daemon restart mid-cell ({backend}): new daemon started -> cell output flowing, median",
                f"{med(flows) * 1000:.0f} ms ({med(f - r for f, r in zip(flows, readies)) * 1000:.0f} ms after ready)",
                f"{med(readies) * 1000:.0f} ms (the daemon's own start to ready)",
                "< 1 s" if backend == "process" else "< 2 s",
            )
        )
    rows += [
        (
            f"attach: {args.attach_mb} MB of buffered output replayed, median",
            f"{med(attaches) * 1000:.0f} ms",
            f"{med(raws) * 1000:.0f} ms (raw pyzmq, same bytes)",
            "",
        ),
    ]
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.reps} reps")
    print_table(rows[0], rows[1:])


if __name__ == "__main__":
    main()
