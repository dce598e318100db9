"""The data path across hosts: a numpy array shipped into a `%%gpu` cell the first time and
pulled back, on every path a notebook can take to its daemon, beside raw transports
measured in the same run on this machine.

    .venv/bin/python bench/datapath.py [--reps 5] [--mib 256] [--quick] [--only REGEX] [--memory asis|warm|cold]

Each jupyter-gpu row is a real kernel (jupyter_client) with the magic loaded, talking to
its own real daemon (``python -m kernel_worker``, process backend):

- same host, tmpfs shortcut: ipc socket, bulk root on /dev/shm (the notebook maps it);
- loopback tcp to a daemon in its own mount namespace (``unshare --mount``, a private tmpfs
  bulk root, as the tests' ``elsewhere_daemon``): the notebook cannot see its bulk files,
  so every byte travels inline in ZeroMQ frames;
- the same with CurveZMQ (``%gpu connect tcp://... --server-key``);
- ``ssh://`` through a real sshd on loopback to such a daemon, through the system OpenSSH
  client's forward (``auto``) and through paramiko's (``$JUPYTER_GPU_SSH_CLIENT=paramiko``).

Ship: ``big[0] += 1`` in the notebook (so the array is new to the worker), then
``%%gpu cpu`` reading ``big``; pull: ``%%gpu cpu --pull big`` with ``big[0] += 1`` on the
worker. Each is timed inside the kernel around ``run_cell_magic`` (what IPython runs for a
``%%gpu`` cell), so kernel messaging is left out. References, same sizes: raw pyzmq
DEALER -> ROUTER over tcp loopback, zero-copy frames, a reply per message; raw bytes
through OpenSSH's ``ssh -N -L`` (its default ciphers, and the AES-GCM-first list ssh://
uses where the CPU has AES instructions) to a socket server in another process. Medians of
REPS after one warm-up round; paths alternate within each round, each round starting one
path later; ``--memory warm|cold`` gives every transfer the same free memory first
(FreshMemory). Only loopback addresses are used. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from figures import gbps, print_table  # noqa: E402
from support.curve import curve_users  # noqa: E402
from support.daemons import start_daemon  # noqa: E402
from support.kernels import KERNEL_TIMEOUT, kernel  # noqa: E402
from support.orphans import forget_daemon  # noqa: E402
from support.procs import stop_process  # noqa: E402
from support.sshd_server import connect_line, elsewhere_daemon, sshd_server  # noqa: E402

from jupyter_gpu.ssh_forward import GCM_FIRST, READY, has_aes_instructions  # noqa: E402

MIB = 1 << 20
Op = Callable[[], float]  # one timed transfer: seconds

SHIP = """big[0] += 1
_t = time.perf_counter(); get_ipython().run_cell_magic('gpu', 'cpu', 'n = big.nbytes')
print('took', time.perf_counter() - _t)"""
PULL = """_t = time.perf_counter(); get_ipython().run_cell_magic('gpu', 'cpu --pull big', 'big[0] += 1')
print('took', time.perf_counter() - _t)"""


# ----------------------------------------------------------------------------- jupyter-gpu


def krun(kc, code: str) -> tuple[str, str]:  # noqa: ANN001
    """Execute ``code``: (its stdout and any error's traceback, its status)."""
    out: list[str] = []

    def hook(m: dict) -> None:
        if m["msg_type"] == "stream":
            out.append(m["content"]["text"])
        elif m["msg_type"] == "error":
            out.append("\n".join(m["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=KERNEL_TIMEOUT, output_hook=hook)
    return "".join(out), reply["content"]["status"]


def timed_cell(kc, code: str) -> float:
    out, status = krun(kc, code)
    m = re.search(r"^took (\S+)$", out, re.M)
    if status != "ok" or not m:
        raise SystemExit(f"cell failed ({status}): {code!r}\n{out}")
    return float(m.group(1))


def magic_path(
    stack: contextlib.ExitStack, connection_file: str, nbytes: int, *setup: str, env: dict, via: str = ""
) -> tuple:
    """(ship, pull) ops through a real kernel whose magic reaches the daemon as ``setup``
    says; ``via``: the ssh client its tunnel must be forwarding through."""
    km, kc = stack.enter_context(kernel(connection_file, *setup, env=env))
    check = "print(get_ipython().magics_manager.registry['GPUMagics']._tunnel.via)"
    for code in ("import time, numpy as np", f"big = np.random.rand({nbytes // 8})", "%%gpu cpu\npass"):
        out, status = krun(kc, code)
        if status != "ok":
            raise SystemExit(f"setup failed: {code!r}\n{out}")
    if via and krun(kc, check)[0].strip() != via:
        raise SystemExit(f"the tunnel does not forward through {via}: {krun(kc, check)}")
    return (lambda: timed_cell(kc, SHIP)), (lambda: timed_cell(kc, PULL))


def daemon(stack: contextlib.ExitStack, d) -> str:  # noqa: ANN001
    """Stop ``d`` (and any worker it leaves) when the bench ends; its connection file."""
    stack.callback(forget_daemon, d.connection_file)
    stack.callback(d.stop)
    return d.connection_file


# ----------------------------------------------------------------------------- references


def _zmq_router(port_out, nbytes: int) -> None:  # noqa: ANN001 -- a multiprocessing pipe end
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port_out.send(s.bind_to_random_port("tcp://127.0.0.1"))
    payload = bytearray(nbytes)
    while True:
        frames = s.recv_multipart(copy=False)
        op = frames[1].bytes
        if op == b"stop":
            return
        s.send_multipart([frames[0], payload if op == b"pull" else b"ok"], copy=False)


def zmq_reference(stack: contextlib.ExitStack, nbytes: int) -> tuple:
    """(ship, pull) ops: raw DEALER -> ROUTER over tcp loopback, zero-copy, reply per message."""
    mine, theirs = mp.get_context("spawn").Pipe()
    p = mp.get_context("spawn").Process(target=_zmq_router, args=(theirs, nbytes), daemon=True)
    p.start()
    stack.callback(p.join, 10)
    port = mine.recv()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    stack.callback(ctx.destroy, 0)
    stack.callback(s.send_multipart, [b"stop"])
    payload = bytearray(nbytes)

    def ship() -> float:
        t = time.perf_counter()
        s.send_multipart([b"ship", payload], copy=False)
        s.recv()
        return time.perf_counter() - t

    def pull() -> float:
        t = time.perf_counter()
        s.send(b"pull")
        s.recv(copy=False)
        return time.perf_counter() - t

    return ship, pull


def _byte_server(port_out, nbytes: int) -> None:  # noqa: ANN001
    """One connection at a time: b"s" then NBYTES in, b"k" out; b"p": NBYTES out."""
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    port_out.send(srv.getsockname()[1])
    payload = bytearray(nbytes)

    def serve(c: socket.socket) -> None:
        buf = memoryview(bytearray(nbytes))
        while (op := c.recv(1)) in (b"s", b"p"):
            if op == b"p":
                c.sendall(payload)
                continue
            got = 0
            while got < nbytes:
                n = c.recv_into(buf[got:])
                if not n:
                    return
                got += n
            c.sendall(b"k")
        c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def byte_server(stack: contextlib.ExitStack, nbytes: int) -> int:
    """The loopback port of a raw byte server in a process of its own (stopped by its pid)."""
    mine, theirs = mp.get_context("spawn").Pipe()
    p = mp.get_context("spawn").Process(target=_byte_server, args=(theirs, nbytes), daemon=True)
    p.start()
    stack.callback(p.join, 10)
    stack.callback(p.kill)
    return mine.recv()


def ssh_reference(stack: contextlib.ExitStack, sshd: dict, port: int, nbytes: int, ciphers: str) -> tuple:
    """(ship, pull) ops: raw bytes through a plain ``ssh -N -L`` to the byte server at ``port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    d = sshd["dir"]
    cmd = ["ssh", "-N", "-p", str(sshd["port"]), "-l", sshd["user"], "-i", f"{d}/id_test", "-o", "BatchMode=yes"]
    cmd += ["-o", f"UserKnownHostsFile={d}/known_hosts", "-o", "ExitOnForwardFailure=yes"]
    cmd += ["-o", "PermitLocalCommand=yes", "-o", f"LocalCommand=echo {READY}", *(["-c", ciphers] if ciphers else [])]
    cmd += ["-L", f"127.0.0.1:{local}:127.0.0.1:{port}", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    stack.callback(stop_process, proc, 5)
    if proc.stdout.readline().strip() != READY.encode():
        raise SystemExit(f"ssh -L did not start: {proc.wait()}")
    c = socket.create_connection(("127.0.0.1", local))
    stack.callback(c.close)
    buf = memoryview(bytearray(nbytes))

    def ship() -> float:
        t = time.perf_counter()
        c.sendall(b"s")
        c.sendall(buf)
        c.recv(1)
        return time.perf_counter() - t

    def pull() -> float:
        t = time.perf_counter()
        c.sendall(b"p")
        got = 0
        while got < nbytes:
            got += c.recv_into(buf[got:])
        return time.perf_counter() - t

    return ship, pull


# ----------------------------------------------------------------------------- memory state

REPORTED_S = 3.0  # free page reporting hands back pages free for 2 s (Linux's PAGE_REPORTING_DELAY)
WARM_VALUES = 3  # warm memory freed before each transfer, in values: the receiver's buffer and the queues'


class FreshMemory:
    """What free memory each timed transfer starts with, whatever path ran before it.

    Every transfer writes into memory just handed to its receiver (the new value's buffer,
    the daemon's queue of chunks), and in a VM with free page reporting (virtio-balloon,
    as on the 2-CPU VM this was written on) the host takes back pages free for 2 s: a huge
    page faulted in again then cost 1.5-3.5 ms per MiB, against 0.2 ms for one freed a
    moment ago. With the order of the paths fixed, a path ran on what the path before it
    had just freed or on cold pages: the tcp row came after the tmpfs one, which frees no
    anonymous memory, and shipped at 0.3-0.5 GB/s in full runs (its worker's copy into cold
    huge pages alone took 600-800 ms), 0.9-1.2 GB/s alone; the raw pyzmq row came after a
    pull that had just freed 256 MiB. Receivers now take 4 KiB pages where the host takes
    free ones back (kernel_worker/buffers.py), which cost about the same either way, and
    each round starts one path later.

    ``asis`` (the default) leaves memory as it comes; ``warm`` frees WARM_VALUES values'
    worth of just-touched huge pages right before each transfer (as on a host without page
    reporting); ``cold`` first waits until free memory went back to the host (a VM's worst
    case). Compare them to see how much a row depends on the memory it was given.
    """

    def __init__(self, mode: str, nbytes: int):
        self.mode, self.nbytes = mode, nbytes
        self.reserve: mmap.mmap | None = None

    def prime(self) -> None:
        """Untimed, before each transfer."""
        if self.mode == "cold":
            time.sleep(REPORTED_S)
        elif self.mode == "warm":
            size = WARM_VALUES * self.nbytes
            self.reserve = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.reserve.madvise(mmap.MADV_HUGEPAGE)
            page = bytes(MIB)
            for _ in range(size // MIB):
                self.reserve.write(page)

    def release(self) -> None:
        """Just before the timer starts: the warm pages go back to the free lists."""
        if self.reserve is not None:
            self.reserve.close()
            self.reserve = None


# ----------------------------------------------------------------------------- the run


def paths(stack: contextlib.ExitStack, tmp: Path, nbytes: int, only: str = "") -> dict[str, tuple]:
    """Every path's (ship, pull) ops, all started before any is timed; with ``only``, just
    the paths whose label matches that regular expression (e.g. ``tcp|CurveZMQ|pyzmq``)."""
    out: dict[str, tuple] = {}
    auto, para = {"JUPYTER_GPU_SSH_CLIENT": "auto"}, {"JUPYTER_GPU_SSH_CLIENT": "paramiko"}

    def want(label: str) -> bool:
        return not only or re.search(only, label) is not None

    label = "same host, tmpfs shortcut"
    if want(label):
        shm = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jgpu-datapath-", dir="/dev/shm")))
        out[label] = magic_path(stack, daemon(stack, start_daemon(shm)), nbytes, env=auto)
    label = "loopback tcp, daemon in its own mount namespace (inline frames)"
    if want(label):
        (tmp / "tcp").mkdir()
        out[label] = magic_path(stack, daemon(stack, elsewhere_daemon(tmp / "tcp")), nbytes, env=auto)
    label = "same with CurveZMQ"
    if want(label):
        (tmp / "curve").mkdir()
        kd, server_pub, _ = curve_users(tmp / "curve", ("alice",))
        d = elsewhere_daemon(tmp / "curve", "--WorkerDaemon.curve=True", "--WorkerDaemon.single_tenant=True",
                             f"--WorkerDaemon.keys_dir={kd}")  # fmt: skip
        connect = f"%gpu connect {d.url} --server-key {server_pub.decode()} --client-key {tmp}/curve/alice"
        out[label] = magic_path(stack, daemon(stack, d), nbytes, connect, env=auto)
    sshd = None
    for via, env in (("openssh", auto), ("paramiko", para)):
        label = "`ssh://`, " + ("OpenSSH's forward" if via == "openssh" else "paramiko's forward (the fallback)")
        if want(label):
            if sshd is None:
                (tmp / "ssh").mkdir()
                sshd = stack.enter_context(sshd_server(tmp / "ssh"))
            (tmp / via).mkdir()
            d = elsewhere_daemon(tmp / via)
            out[label] = magic_path(stack, daemon(stack, d), nbytes, connect_line(sshd, d), env=env, via=via)
    label = "raw pyzmq DEALER→ROUTER, tcp loopback, zero-copy"
    if want(label):
        out[label] = zmq_reference(stack, nbytes)
    refs = ["OpenSSH `ssh -L` carrying raw bytes, default ciphers"]
    if has_aes_instructions():
        refs.append("OpenSSH `ssh -L` carrying raw bytes, AES-GCM first (as `ssh://`)")
    for label in filter(want, refs):
        if sshd is None:
            (tmp / "ssh").mkdir()
            sshd = stack.enter_context(sshd_server(tmp / "ssh"))
        port = byte_server(stack, nbytes)
        out[label] = ssh_reference(stack, sshd, port, nbytes, GCM_FIRST if "AES-GCM" in label else "")
    return out


def compared(label: str, ship: float, pull: float, med: dict[str, tuple[float, float]]) -> str:
    """How many times a reference's time this row's is, ship / pull."""
    if label.startswith("`ssh://`"):
        ref = next((k for k in med if "AES-GCM" in k), "OpenSSH `ssh -L` carrying raw bytes, default ciphers")
    elif label.startswith(("loopback", "same with", "same host")):
        ref = "raw pyzmq DEALER→ROUTER, tcp loopback, zero-copy"
    else:
        return ""
    if ref not in med:
        return ""
    return f"{ship / med[ref][0]:.2f}× / {pull / med[ref][1]:.2f}× {ref.split(',')[0]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256, help="array size in MiB")
    ap.add_argument("--quick", action="store_true", help="16 MiB, 2 reps: checks the bench runs")
    ap.add_argument("--only", default="", help="a regular expression: just the paths whose label matches it")
    ap.add_argument(
        "--memory", choices=("asis", "warm", "cold"), default="asis",
        help="the free memory each transfer starts with (see FreshMemory): asis (default), warm, cold",
    )  # fmt: skip
    ap.add_argument("--samples", action="store_true", help="also print every timed transfer, in ms, round by round")
    args = ap.parse_args()
    if args.quick:
        args.mib, args.reps = 16, 2
    nbytes = args.mib * MIB
    started, load_before = time.monotonic(), os.getloadavg()[0]
    times: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="jgpu-datapath-") as tmp, contextlib.ExitStack() as stack:
        ops = paths(stack, Path(tmp), nbytes, args.only)
        memory = FreshMemory(args.memory, nbytes)

        def timed(op: Op) -> float:
            memory.prime()
            memory.release()
            return op()

        order = list(ops.items())
        for rnd in range(args.reps + 1):  # round 0 warms every path up and is not counted
            for label, (ship, pull) in order[rnd % len(order) :] + order[: rnd % len(order)]:  # each first in turn
                s, p = timed(ship), timed(pull)
                if rnd:
                    times.setdefault(label, ([], []))[0].append(s)
                    times[label][1].append(p)
    times = {k: times[k] for k in ops}  # in the table's order, not the last round's
    med = {k: (statistics.median(s), statistics.median(p)) for k, (s, p) in times.items()}
    rows = [(k, gbps(nbytes, s), gbps(nbytes, p), compared(k, s, p, med)) for k, (s, p) in med.items()]
    load = os.getloadavg()[0]  # others' work on this machine moves every row: say how much there was
    print(
        f"# {args.mib} MiB, medians of {args.reps}, {args.memory} memory, {os.cpu_count()} CPUs, "
        f"load average {load_before:.1f} at the start, {load:.1f} at the end, {time.monotonic() - started:.0f} s in all"
    )
    print_table(("path", "ship", "pull", "time vs reference (ship / pull)"), rows)
    if args.samples:
        ms = lambda xs: " ".join(f"{x * 1e3:5.0f}" for x in xs)  # noqa: E731
        for k, (s, p) in times.items():
            print(f"{k[:40]:40} ship {ms(s)} | pull {ms(p)}")


if __name__ == "__main__":
    main()
