"""jupyter-gpu against ipyparallel and raw pyzmq, measured in one run on this machine.

    python bench/bench.py [--quick]

Everything runs through a real IPython InteractiveShell (the magics exactly as a
notebook calls them), a real daemon subprocess and a real ipyparallel cluster.
Prints one table. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

# The daemon and the Docker engine are started exactly as the tests start them.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from figures import gbps, ms, pct, print_table  # noqa: E402
from support.daemons import start_daemon  # noqa: E402
from support.logs import LogWatcher  # noqa: E402
from support.procs import stop_process, wait_listening  # noqa: E402


def private_dir(tmp: str, name: str) -> Path:
    path = Path(tmp) / name
    path.mkdir()
    return path


MB = 1024 * 1024
BIG = 256 * MB


# ----------------------------------------------------------------------------- raw pyzmq


def _echo(url: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(url)
    while True:
        frames = s.recv_multipart(copy=False)
        if frames[-1].bytes == b"stop":
            return
        s.send_multipart([frames[0], b"ok"])


def bench_pyzmq(tmp: str, reps: int) -> dict:
    url = f"ipc://{tmp}/echo.sock"
    p = mp.get_context("spawn").Process(target=_echo, args=(url,))
    p.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(url)
    s.send(b"x")
    s.recv_multipart()
    rtt = []
    for _ in range(reps):
        t = time.perf_counter()
        s.send(b"x")
        s.recv_multipart()
        rtt.append(time.perf_counter() - t)
    big = np.random.rand(BIG // 8)
    sends = []
    for _ in range(3):
        t = time.perf_counter()
        s.send(memoryview(big), copy=False)
        s.recv_multipart()
        sends.append(time.perf_counter() - t)
    s.send(b"stop")
    p.join(10)
    s.close(0)
    ctx.term()
    return {"rtt": rtt, "big": min(sends)}


# ----------------------------------------------------------------------------- jupyter-gpu


def bench_wire(d, reps: int) -> list[float]:
    """Empty EXECUTEs through the daemon to a warm worker and back, without IPython or the
    magic: the daemon's and executor's share of a cell, beside a raw pyzmq echo."""
    from jupyter_gpu.client import DaemonClient
    from kernel_worker import protocol as P

    client = DaemonClient(d.url, d.key)

    def one() -> float:
        t = time.perf_counter()
        client.request(P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": ""}, "bench-wire"), timeout=30)
        return time.perf_counter() - t

    try:
        for _ in range(reps // 10):
            one()
        return [one() for _ in range(reps)]
    finally:
        client.request(P.Message(P.Msg.RELEASE, {}, "bench-wire"), timeout=30)
        client.close()


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def timed(ip, cell: str) -> float:
    with quiet():
        t = time.perf_counter()
        r = ip.run_cell(cell, store_history=False)
        dt = time.perf_counter() - t
    if not r.success:
        raise SystemExit(f"cell failed: {cell!r}: {r.error_in_exec or r.error_before_exec}")
    return dt


def empty_and_cold(ip, reps: int, cold_reps: int) -> dict:
    """Warm empty-cell round trips, then first cells of new sessions."""
    timed(ip, "%%gpu cpu\npass")
    out = {"empty": [timed(ip, "%%gpu cpu\npass") for _ in range(reps)]}
    cold = []
    for _ in range(cold_reps):
        with quiet():
            ip.run_cell("%gpu release")
        cold.append(timed(ip, "%%gpu cpu\npass"))
    out["cold"] = cold
    return out


def bench_gpu(ip, reps: int, cold_reps: int) -> dict:
    ip.run_cell("%load_ext jupyter_gpu")
    out = empty_and_cold(ip, reps, cold_reps)
    ip.user_ns["big"] = np.random.rand(BIG // 8)
    first = []
    for _ in range(3):
        ip.user_ns["big"][0] += 1  # changed locally: travels again
        first.append(timed(ip, "%%gpu cpu\nbig.shape"))
    out["big_first"] = min(first)
    out["big_again"] = min(timed(ip, "%%gpu cpu\nbig.shape") for _ in range(5))
    del ip.user_ns["big"]
    timed(ip, "%%gpu cpu\ndel big")
    lines = 200_000
    t = timed(ip, f"%%gpu cpu\nfor i in range({lines}): print('x' * 40)")
    out["stdout"] = (lines * 41, t)
    return out


# ----------------------------------------------------------------------------- ipyparallel


def bench_ipp(ip, reps: int) -> dict | None:
    try:
        import ipyparallel as ipp
    except ImportError:
        return None
    with quiet():
        cluster = ipp.Cluster(n=1, log_level=40)
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(1, timeout=60)
    try:
        dv = rc[:]
        dv.activate()
        timed(ip, "%%px --block\npass")
        out: dict = {"px": [timed(ip, "%%px --block\npass") for _ in range(reps)]}
        dv.apply_sync(lambda: None)
        apply = []
        for _ in range(reps):
            t = time.perf_counter()
            dv.apply_sync(lambda: None)
            apply.append(time.perf_counter() - t)
        out["apply"] = apply
        big = np.random.rand(BIG // 8)
        pushes = []
        for _ in range(3):
            t = time.perf_counter()
            dv.push({"big": big}, block=True)
            pushes.append(time.perf_counter() - t)
        out["push"] = min(pushes)
        dv.execute("del big", block=True)
        lines = 200_000
        out["stdout"] = (lines * 41, timed(ip, f"%%px --block\nfor i in range({lines}): print('x' * 40)"))
        return out
    finally:
        with quiet():
            cluster.stop_cluster_sync()


def bench_docker(ip, tmp: str, reps: int, cold_reps: int) -> dict | None:
    """The same cells on the docker backend: a real engine and the test image (``make test-image``)."""
    import sysconfig

    from support import dockerd

    if not dockerd.ROOTFS_TAR.exists():
        print(f"# docker rows skipped: {dockerd.ROOTFS_TAR} missing (make test-image)", file=sys.stderr)
        return None
    engine = dockerd.start_engine(LogWatcher)
    try:
        dockerd.ensure_images(engine.client, engine.url)
        site = sysconfig.get_paths()["purelib"]
        d = start_daemon(
            private_dir(tmp, "docker"),
            "--backend=docker",
            f"--DockerBackend.docker_url={engine.url}",
            f"--DockerBackend.image={dockerd.IMAGE}",
            "--DockerBackend.network_mode=none",
            f"--DockerBackend.extra_mounts={site}:/opt/notebook-site:ro",
            "--DockerBackend.extra_env=PYTHONPATH=/opt/notebook-site",
        )
        magics = ip.magics_manager.registry["GPUMagics"]
        with quiet():
            ip.run_cell("%gpu release")
        magics._drop_client()
        magics.connection_file = d.connection_file
        try:
            return empty_and_cold(ip, reps, cold_reps)
        finally:
            with quiet():
                ip.run_cell("%gpu release")
            d.stop()
    finally:
        engine.stop()


# ----------------------------------------------------------------------------- the sidebar's API


def bench_sidebar(tmp: str, reps: int) -> dict:
    """GET gpus through a real Jupyter Server (the sidebar's poll), next to Jupyter's own
    GET /api/status on the same server and connection."""
    import http.client
    import socket
    import subprocess
    import uuid

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = uuid.uuid4().hex
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={tmp}",
            *(["--allow-root"] if os.getuid() == 0 else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        LogWatcher(proc.stderr, Path(tmp) / "server.log").wait_for(r"Jupyter Server .* is running at", timeout=60)
        wait_listening(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def get(path: str) -> float:
            t = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"token {token}"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {r.status}")
            return time.perf_counter() - t

        out = {}
        for name, path in (("gpus", "/jupyter-gpu/api/gpus"), ("status", "/api/status")):
            get(path)  # warm: connection, daemon link
            out[name] = [get(path) for _ in range(reps)]
        conn.close()
        return out
    finally:
        stop_process(proc, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-ipp", action="store_true", help="skip ipyparallel")
    ap.add_argument("--no-docker", action="store_true", help="skip the docker backend rows")
    args = ap.parse_args()
    reps, cold_reps = (100, 3) if args.quick else (500, 10)
    from IPython.core.interactiveshell import InteractiveShell

    with tempfile.TemporaryDirectory(prefix="jgpu-bench-") as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = tmp
        d = start_daemon(private_dir(tmp, "process"))
        os.environ["JUPYTER_GPU_CONNECTION_FILE"] = d.connection_file
        try:
            zmq_r = bench_pyzmq(tmp, reps)  # before IPython replaces __main__ (spawn needs it)
            wire = bench_wire(d, reps * 4)
            ip = InteractiveShell.instance()
            gpu = bench_gpu(ip, reps, cold_reps)
            ipp_r = None if args.no_ipp else bench_ipp(ip, reps)
            dock = None if args.no_docker else bench_docker(ip, tmp, reps, cold_reps)
            side = bench_sidebar(tmp, reps)
        finally:
            d.stop()
    rows = [
        (
            "empty cell round trip, warm, p50",
            ms(pct(gpu["empty"], 50)),
            ms(pct(ipp_r["px"], 50)) + " (%%px)" if ipp_r else "-",
            ms(pct(zmq_r["rtt"], 50)),
            "< 1.5 ms, 2x faster than %%px",
        ),
        (
            "empty cell round trip, warm, p99",
            ms(pct(gpu["empty"], 99)),
            ms(pct(ipp_r["px"], 99)) + " (%%px)" if ipp_r else "-",
            ms(pct(zmq_r["rtt"], 99)),
            "",
        ),
        (
            "daemon round trip, empty execute, no IPython, p50",
            ms(pct(wire, 50)),
            "-",
            ms(pct(zmq_r["rtt"], 50)),
            "",
        ),
        ("apply_sync(lambda: None), p50", "-", ms(pct(ipp_r["apply"], 50)) if ipp_r else "-", "-", ""),
        (
            "256 MB local array, first time",
            gbps(BIG, gpu["big_first"]),
            gbps(BIG, ipp_r["push"]) + " (push)" if ipp_r else "-",
            gbps(BIG, zmq_r["big"]),
            ">= 1 GB/s",
        ),
        ("256 MB local array, unchanged", ms(gpu["big_again"]), "-", "-", "< 20 ms"),
        ("cold start (first cell, new session), median", ms(statistics.median(gpu["cold"])), "-", "-", "< 1 s"),
        (
            "docker backend: empty cell round trip, warm, p50",
            ms(pct(dock["empty"], 50)) if dock else "-",
            "-",
            "-",
            "within 20% of process",
        ),
        (
            "docker backend: cold start (container start included), median",
            ms(statistics.median(dock["cold"])) if dock else "-",
            "-",
            "-",
            "< 1.5 s",
        ),
        (
            "stdout throughput (8 MB of print)",
            f"{gpu['stdout'][0] / gpu['stdout'][1] / 1e6:.1f} MB/s",
            f"{ipp_r['stdout'][0] / ipp_r['stdout'][1] / 1e6:.1f} MB/s" if ipp_r else "-",
            "-",
            "",
        ),
    ]
    rows.append(
        (
            "sidebar poll: GET jupyter-gpu/api/gpus via Jupyter Server, p50",
            ms(pct(side["gpus"], 50)),
            "-",
            "-",
            f"< 20 ms (Jupyter's own GET /api/status: {ms(pct(side['status'], 50))})",
        )
    )
    head = ("metric", "jupyter-gpu", "ipyparallel", "raw pyzmq", "target")
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {reps} reps, process backend, cpu device")
    print_table(head, rows)


if __name__ == "__main__":
    main()
