"""N real kernels, each running a real notebook of short cells, at once, against one daemon.

    python bench/load.py [--n 8,16,32,64] [--cells 10] [--gpus 4] [--timeout 900]

For each N the same notebook runs three ways, each through nbclient with N real ipykernel
kernels at once: locally (no ``%%gpu``: the reference, so that the kernels' own start-up and
nbclient's overhead are visible), with ``%%gpu cpu`` cells (no GPU: never queues, every
kernel gets its own worker at once) and with ``%%gpu H100`` cells on a daemon simulating
four H100s (N kernels queue for 4 GPUs). One daemon (process backend) serves every run.

Each notebook: a setup cell, then ``--cells`` cells that print tokens naming the run, the
kernel and the cell (two stdout lines and an Out[] value), then ``%gpu release``. Every
token must come back exactly once, in its own notebook's own cell, in order; a queued
notebook's "in queue" lines must count down one place at a time to 1st (the queue served
in order). Prints one table, as bench/bench.py does. Not a test, but it exits non-zero when
an output was lost or misrouted or the queue was served out of order; tests/test_load.py
runs the bounded version (N=8).

How the notebooks are made to run at once. nbclient starts the N kernels; no notebook
sends its first ``%%gpu`` cell until all N kernels have run their setup cell (gate 1), and
no notebook sends its second until every one of the N first requests has reached the
daemon: it either shows an "in queue" line or has finished (gate 2). So, with G GPUs,
exactly G notebooks hold a GPU and N-G wait in the queue, at distinct places, before the
first GPU is given back. The gates wait on kernel messages, never on time.

How dispatch is measured (the time from the kernel sending a request until the executor
has it). The setup cell registers an IPython ``pre_run_cell`` hook that sets ``t_sent =
time.time()`` just before each cell runs in the kernel, i.e. before the magic captures the
cell's variables and sends the request; ``t_sent`` is a variable the cell reads, so it
travels with the cell. The remote cell's first statement is ``t_got = time.time()``, and
it prints ``t_got - t_sent``. Kernel, daemon and worker share this host, hence one clock. So
"dispatch" includes the magic's own work before the send (closure capture, hashing), the
daemon's relay and the worker's start of the cell; for a session's first cell it also
includes the wait in the queue and the worker's cold start, shown apart.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from traitlets.config import Config

# The daemon is started exactly as the tests start it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # imported by path from tests/test_load.py too
from figures import ms, pct, print_table  # noqa: E402
from support.daemons import Daemon, start_daemon  # noqa: E402

GPU_MODEL = "H100"
LOCAL = "local"
TOKEN_RE = re.compile(r"LOAD (\S+) k(\d+) c(\d+) ([abr])\b")
DISPATCH_RE = re.compile(r"LOAD \S+ k\d+ c\d+ a dispatch=([0-9.]+)")
QUEUE_RE = re.compile(r"(\d+)(?:st|nd|rd|th) in queue")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
WAITED_RE = re.compile(r"waited ([0-9.]+) s in the queue")
PARTS = "abr"  # per cell: two stdout lines (a, b), then the cell's value (r)


def daemon_args(gpus: int) -> list[str]:
    """G simulated GPUs, and no per-user limits (all N kernels are one user's)."""
    return [
        f"--simulate-gpus={GPU_MODEL}:{gpus}",
        "--WorkerDaemon.max_sessions_per_user=0",
        "--WorkerDaemon.max_gpus_per_user=0",
        "--WorkerDaemon.max_queued_per_user=0",
    ]


# ----------------------------------------------------------------------------- the notebook

SETUP = """\
%load_ext jupyter_gpu
import time

def _stamp(info):  # just before each cell runs in this kernel: the time its request leaves
    get_ipython().user_ns["t_sent"] = time.time()

get_ipython().events.register("pre_run_cell", _stamp)"""


def cell_source(spec: str, tag: str, k: int, i: int) -> str:
    head = "" if spec == LOCAL else f"%%gpu {spec}\n"
    tok = f"LOAD {tag} k{k:03d} c{i:02d}"
    return (
        f"{head}import time; t_got = time.time()\n"
        f'print("{tok} a", f"dispatch={{t_got - t_sent:.6f}}")\n'
        f'print("{tok} b")\n'
        f'"{tok} r"'
    )


def make_notebook(spec: str, tag: str, k: int, cells: int) -> nbformat.NotebookNode:
    """The same notebook for every mode; ``spec`` LOCAL drops the ``%%gpu`` lines."""
    body = [cell_source(spec, tag, k, i) for i in range(1, cells + 1)]
    last = "pass" if spec == LOCAL else "%gpu release"
    return new_notebook(cells=[new_code_cell(c) for c in (SETUP, *body, last)])


# ----------------------------------------------------------------------------- running N at once


class Gate:
    """Opens once every one of ``n`` notebooks has passed it (or failed)."""

    def __init__(self, n: int):
        self.n, self.passed, self.open = n, set(), asyncio.Event()

    def arrive(self, k: int) -> None:
        self.passed.add(k)
        if len(self.passed) >= self.n:
            self.open.set()

    async def wait(self, timeout: float, what: str) -> None:
        try:
            await asyncio.wait_for(self.open.wait(), timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(range(self.n)) - self.passed)
            raise AssertionError(f"kernels {missing} never {what} within {timeout} s") from None


@dataclass
class Kernel:
    """What the driver saw of one notebook's run."""

    k: int
    ready: float = 0.0  # perf_counter when its setup cell was done
    ran: float = 0.0  # ... when its last cell was done
    done: float = 0.0  # ... when its kernel was shut down
    rtt: dict[int, float] = field(default_factory=dict)  # cell index -> nbclient round trip, s
    positions: list[int] = field(default_factory=list)  # its "N-th in queue" lines, as they came
    error: str = ""


class LoadClient(NotebookClient):
    """nbclient's own client, with the two gates and the measurements around each cell."""

    def __init__(self, nb, me: Kernel, gates: tuple[Gate, Gate], gate_timeout: float, **kw):
        super().__init__(nb, **kw)
        self.me, self.gates, self.gate_timeout = me, gates, gate_timeout
        self.me_cell = -1  # the cell running (for a failure's message)

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        if cell_index == 1:
            self.me.ready = time.perf_counter()
            self.gates[0].arrive(self.me.k)
            await self.gates[0].wait(self.gate_timeout, "finished their setup cell")
        elif cell_index == 2:
            await self.gates[1].wait(self.gate_timeout, "reached the daemon with their first cell")
        self.me_cell = cell_index
        t = time.perf_counter()
        out = await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        self.me.ran = time.perf_counter()
        self.me.rtt[cell_index] = self.me.ran - t
        if cell_index == 1:
            self.gates[1].arrive(self.me.k)
        return out

    def process_message(self, msg, cell, cell_index):
        if cell_index == 1 and msg["msg_type"] in ("display_data", "update_display_data"):
            m = QUEUE_RE.search(str(msg["content"].get("data", {}).get("text/plain", "")))
            if m:
                self.me.positions.append(int(m.group(1)))
                self.gates[1].arrive(self.me.k)  # its request is in the daemon's queue
        return super().process_message(msg, cell, cell_index)


async def _run_all(nbs: list, kernels: list[Kernel], workdir: Path, timeout: float) -> None:
    gates = (Gate(len(nbs)), Gate(len(nbs)))
    ipc = workdir / "ipc"
    ipc.mkdir()

    async def one(nb, me: Kernel) -> None:
        # ipc sockets named per kernel: no TCP port races between N kernels started at once,
        # nor with another copy of the suite running beside this one.
        cfg = Config({"KernelManager": {"transport": "ipc", "ip": str(ipc / f"k{me.k}")}})
        client = LoadClient(
            nb,
            me,
            gates,
            timeout,
            config=cfg,
            kernel_name="python3",
            timeout=timeout,
            startup_timeout=timeout,
            # Wait for every output that follows a reply; never drop late output silently
            # (nbclient's default waits 4 s and then goes on without it).
            iopub_timeout=timeout,
            raise_on_iopub_timeout=True,
            resources={"metadata": {"path": str(workdir)}},
        )
        try:
            await client.async_execute()
        except BaseException as e:
            last = [ln for ln in ANSI_RE.sub("", str(e)).splitlines() if ln.strip()][-1:] or [""]
            me.error = f"{type(e).__name__} in cell {client.me_cell}: {last[0]}"
        finally:
            me.done = time.perf_counter()
            for g in gates:
                g.arrive(me.k)  # a failed notebook never holds the others up

    await asyncio.gather(*(one(nb, me) for nb, me in zip(nbs, kernels)))


# ----------------------------------------------------------------------------- checks


def check_outputs(nbs: list, tag: str, cells: int) -> dict:
    """Every token exactly once, in its own notebook's own cell, in order."""
    seen: collections.Counter = collections.Counter()
    misrouted = out_of_order = 0
    for k, nb in enumerate(nbs):
        for idx, cell in enumerate(nb.cells):
            found = []
            for o in cell.get("outputs", []):
                if o.output_type == "stream":
                    found += TOKEN_RE.findall(o.text)
                elif o.output_type in ("execute_result", "display_data"):
                    found += TOKEN_RE.findall(str(o.data.get("text/plain", "")))
            seen.update(found)
            mine = []
            for tok in found:
                if tok[0] != tag or int(tok[1]) != k or int(tok[2]) != idx:
                    misrouted += 1
                else:
                    mine.append(tok[3])
            if 1 <= idx <= cells and mine != list(PARTS) and sorted(mine) == sorted(PARTS):
                out_of_order += 1
    expected = {(tag, f"{k:03d}", f"{i:02d}", p) for k in range(len(nbs)) for i in range(1, cells + 1) for p in PARTS}
    return {
        "lost": sum(1 for t in expected if seen[t] == 0),
        "duplicated": sum(n - 1 for t, n in seen.items() if t in expected and n > 1),
        "misrouted": misrouted,
        "out_of_order": out_of_order,
        "tokens": len(expected),
    }


def check_queue(kernels: list[Kernel], gpus: int) -> dict:
    """FIFO, from the "in queue" lines each queued cell showed. Requests are alike (one GPU
    each) and a GPU comes back one session at a time, so in a FIFO queue every waiter's
    place drops by exactly one each time a GPU is given out and it gets its GPU from 1st
    place; a newcomer put ahead of others would raise their places, a waiter served
    before the 1st would leave from a place other than 1st. With the gates, exactly
    ``gpus`` kernels never queue and the rest join at distinct places 1..N-gpus."""
    queued = [me for me in kernels if me.positions]
    bad = [me.k for me in queued if me.positions != list(range(me.positions[0], 0, -1))]
    joins = sorted(me.positions[0] for me in queued)
    n_wait = max(0, len(kernels) - gpus)
    return {
        "queued": len(queued),
        "not_fifo": bad,
        "joins_ok": joins == list(range(1, n_wait + 1)),
        "max_place": max(joins, default=0),
        "in_order": not bad and joins == list(range(1, n_wait + 1)),
    }


# ----------------------------------------------------------------------------- the daemon's share


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def proc_rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass


# ----------------------------------------------------------------------------- one run


def run_load(spec: str, n: int, cells: int, workdir: Path, daemon_pid: int | None, gpus: int, timeout: float) -> dict:
    """N notebooks at once, ``spec`` LOCAL or a ``%%gpu`` request; the measurements and checks.
    Kernels find the daemon through $JUPYTER_GPU_CONNECTION_FILE, which the caller sets."""
    tag = f"{'local' if spec == LOCAL else spec.lower()}{n}"
    workdir.mkdir(parents=True)
    nbs = [make_notebook(spec, tag, k, cells) for k in range(n)]
    kernels = [Kernel(k) for k in range(n)]
    if daemon_pid:
        reset_peak_rss(daemon_pid)
        cpu0 = proc_cpu_s(daemon_pid)
    t0 = time.perf_counter()
    asyncio.run(_run_all(nbs, kernels, workdir, timeout))
    wall = time.perf_counter() - t0
    r: dict = {"spec": spec, "n": n, "wall": wall, "nbs": nbs, "kernels": kernels}
    r["errors"] = [f"kernel {me.k}: {me.error}" for me in kernels if me.error]
    ready = [me.ready for me in kernels if me.ready]
    r["startup"] = max(ready) - t0 if ready else float("nan")
    ran = max((me.ran for me in kernels), default=0.0)
    r["cells_wall"] = ran - max(ready) if ready else float("nan")
    r["shutdown"] = max(me.done for me in kernels) - ran
    r["rtt"] = [me.rtt[i] for me in kernels for i in range(2, cells + 1) if i in me.rtt]
    r["rtt_first"] = [me.rtt[1] for me in kernels if 1 in me.rtt]
    dispatch: dict[int, list[float]] = collections.defaultdict(list)
    waited = []
    for nb in nbs:
        for idx, cell in enumerate(nb.cells[1 : cells + 1], 1):
            text = "".join(o.text for o in cell.get("outputs", []) if o.output_type == "stream")
            dispatch[idx] += [float(x) for x in DISPATCH_RE.findall(text)]
        first = nb.cells[1].get("outputs", []) if len(nb.cells) > 1 else []
        notes = " ".join(str(o.get("data", {}).get("text/plain", "")) for o in first)
        m = WAITED_RE.search(notes)
        waited.append(float(m.group(1)) if m else 0.0)
    r["dispatch"] = [x for i in range(2, cells + 1) for x in dispatch[i]]
    r["dispatch_first"] = dispatch[1]
    r["outputs"] = check_outputs(nbs, tag, cells)
    if spec not in (LOCAL, "cpu"):
        r["queue"] = check_queue(kernels, gpus)
        r["waited"] = [w for me, w in zip(kernels, waited) if me.positions]
    if daemon_pid:
        r["daemon_cpu"] = proc_cpu_s(daemon_pid) - cpu0
        r["daemon_rss"] = proc_rss_kib(daemon_pid)
    return r


# ----------------------------------------------------------------------------- the table


def secs(x: float) -> str:
    return f"{x:.1f} s"


def _outputs_cell(r: dict) -> str:
    o = r["outputs"]
    bad = o["lost"] + o["misrouted"] + o["duplicated"] + o["out_of_order"]
    text = f"{bad} of {o['tokens']}"
    if bad:
        text += f" (lost {o['lost']}, misrouted {o['misrouted']}, dup {o['duplicated']}, order {o['out_of_order']})"
    if r["errors"]:
        text += f"; {len(r['errors'])} notebook(s) failed"
    return text


def rows_for(n: int, runs: dict[str, dict], gpus: int) -> list[tuple]:
    loc, cpu, gpu = runs.get(LOCAL), runs.get("cpu"), runs.get(GPU_MODEL)
    cols = (loc, cpu, gpu)

    def each(f, *, local=True) -> tuple:
        return tuple("-" if r is None or (r is loc and not local) else f(r) for r in cols)

    def queue_cell(r: dict) -> str:
        if "queue" not in r:
            return "never queues"
        w = r["waited"]
        if not w:
            return "nobody queued"
        return f"{len(w)} queued; p50 {secs(pct(w, 50))}, max {secs(max(w))}"

    def order_cell(r: dict) -> str:
        if "queue" not in r:
            return "-"
        q = r["queue"]
        if q["in_order"] and not q["queued"]:
            return "nobody queued"
        if q["in_order"]:
            return f"in order (places {q['max_place']}..1, one at a time)"
        return f"OUT OF ORDER: kernels {q['not_fifo']}, joins ok {q['joins_ok']}"

    def rss(r: dict) -> str:
        d = r["daemon_rss"]
        return f"{d.get('VmHWM', 0) / 1024:.0f} MiB peak ({d.get('VmRSS', 0) / 1024:.0f} MiB after)"

    label = f"{GPU_MODEL} ×{gpus} simulated"
    return [
        (n, "wall time: N kernels launched -> all done and shut down", *each(lambda r: secs(r["wall"])), ""),
        (n, "  kernel start-up: launch -> all N ran their setup cell", *each(lambda r: secs(r["startup"])), ""),
        (n, "  cells: all N ready -> all N ran their last cell", *each(lambda r: secs(r["cells_wall"])), ""),
        (n, "  kernel shutdown: last cell -> all N kernels gone", *each(lambda r: secs(r["shutdown"])), ""),
        (n, "cell round trip, warm (client side, nbclient), p50", *each(lambda r: ms(pct(r["rtt"], 50))), ""),
        (n, "cell round trip, warm (client side, nbclient), p99", *each(lambda r: ms(pct(r["rtt"], 99))), ""),
        (
            n,
            "dispatch, warm: kernel's request -> executor runs it, p50",
            *each(lambda r: ms(pct(r["dispatch"], 50))),
            "",
        ),
        (
            n,
            "dispatch, warm: kernel's request -> executor runs it, p99",
            *each(lambda r: ms(pct(r["dispatch"], 99))),
            "< 50 ms when GPUs are free",
        ),
        (
            n,
            "first cell: request -> executor (queue + cold start), p50 / max",
            *each(lambda r: f"{ms(pct(r['dispatch_first'], 50))} / {ms(max(r['dispatch_first'], default=0))}"),
            "",
        ),
        (n, f"GPU queue wait (daemon's 'waited'), {label}", *each(queue_cell, local=False), ""),
        (n, "GPU queue served in order (cells' 'in queue' lines)", *each(order_cell, local=False), "in order"),
        (n, "lost / misrouted / duplicated / reordered outputs", *each(_outputs_cell), "0"),
        (n, "daemon CPU time during the run", *each(lambda r: f"{r['daemon_cpu']:.2f} s", local=False), ""),
        (n, "daemon RSS during the run", *each(rss, local=False), ""),
    ]


def print_load_table(rows: list[tuple], gpus: int, cells: int, load_avg: tuple) -> None:
    head = ("N", "metric", "local (no %%gpu)", "%%gpu cpu", f"%%gpu {GPU_MODEL} ({gpus} GPUs)", "target")
    print(
        f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, process backend, {gpus} simulated {GPU_MODEL}, "
        f"{cells} short cells per notebook, N real kernels at once through nbclient; 1-min load average "
        f"{load_avg[0]:.1f} before, {load_avg[1]:.1f} after"
    )
    print_table(head, rows)


def failures(r: dict) -> list[str]:
    o = r["outputs"]
    why = list(r["errors"])
    if o["lost"] or o["misrouted"] or o["duplicated"] or o["out_of_order"]:
        why.append(f"outputs: {o}")
    if "queue" in r and not r["queue"]["in_order"]:
        why.append(f"queue: {r['queue']}")
    return [f"{r['spec']} N={r['n']}: {w}" for w in why]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="8,16,32,64", help="kernel counts, comma-separated (default 8,16,32,64)")
    ap.add_argument("--cells", type=int, default=10, help="%%gpu cells per notebook (default 10)")
    ap.add_argument("--gpus", type=int, default=4, help=f"simulated {GPU_MODEL}s on the daemon (default 4)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for any one wait (default 900)")
    ap.add_argument("--modes", default=f"{LOCAL},cpu,{GPU_MODEL}", help="which columns to run")
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows: list[tuple] = []
    bad: list[str] = []
    # This VM's timings move with whatever else runs on it: the load average before the run
    # is others' work; after it, mostly this run's own kernels.
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="jgpu-load-") as tmp:
        os.environ["JUPYTER_RUNTIME_DIR"] = tmp
        ddir = Path(tmp) / "daemon"
        ddir.mkdir()
        d: Daemon = start_daemon(ddir, *daemon_args(args.gpus))
        os.environ["JUPYTER_GPU_CONNECTION_FILE"] = d.connection_file
        try:
            for n in ns:
                runs = {}
                for spec in modes:
                    t = time.perf_counter()
                    pid = None if spec == LOCAL else d.proc.pid
                    r = run_load(spec, n, args.cells, Path(tmp) / f"{spec}-{n}", pid, args.gpus, args.timeout)
                    print(f"# N={n} {spec}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
                    runs[spec] = r
                    bad += failures(r)
                    r.pop("nbs")  # the executed notebooks: checked already
                rows += rows_for(n, runs, args.gpus)
            if d.proc.poll() is not None:
                bad.append(f"the daemon exited with {d.proc.returncode}")
        finally:
            d.stop()
        noisy = [ln.rstrip() for ln in d.log.lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", ln)]
    print_load_table(rows, args.gpus, args.cells, (load_before, os.getloadavg()[0]))
    if noisy:
        print(f"# daemon log: {len(noisy)} warning/error line(s), first ones:")
        for ln in noisy[:10]:
            print(f"#   {ln}")
    if bad:
        print(
            f"# FAILED ({len(bad)}):",
            *bad[:10],
            *([f"... and {len(bad) - 10} more"] if len(bad) > 10 else []),
            sep="\n#   ",
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
