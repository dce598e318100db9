"""Money, measured: how fast a budget stops a cell, how fast a 1,000,000-cell ledger
answers a spend report, and what per-cell accounting adds to the empty-cell round trip,
each beside a reference measured in the same run.

    python bench/money.py [--runs 20] [--rows 1000000] [--cells 2000] [--before REV] [--after REV]

Tables (real daemon subprocesses, the real client and `jupyter-gpu` command):
- budget enforcement: a simulated H100 at $3600/h ($1/s), cells with a $0.50 budget that
  sleep; from the moment their spend crosses the budget to the KeyboardInterrupt in the
  cell (time.time() in the worker), beside a user's interrupt (INTERRUPT sent, same
  clock, same cell) and the daemon's progress interval (the target);
- spend report: a ledger of ROWS realistic records over 45 days (20 users, about 1,000
  notebooks, six GPU models), `jupyter-gpu cost --since 30d --by notebook --all` from
  process start to exit and the raw SPEND request, beside the same command on an empty
  ledger and the same GROUP BY run on the sqlite file in this process;
- accounting on the hot path: empty cells (`pass`) on warm sessions in alternated blocks:
  a simulated H100 with a price and a cell budget (budget watch, estimate, ledger write)
  and the cpu device with no budget, on this checkout and on REV (default: the commit
  before the money work, 8460dce^) exported with `git archive`, its daemon and workers run
  from there (PYTHONPATH), both daemons up for the whole measurement.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from figures import ms, pct, print_table  # noqa: E402
from support.daemons import start_daemon  # noqa: E402

from jupyter_gpu.client import DaemonClient  # noqa: E402
from kernel_worker import ledger_db  # noqa: E402
from kernel_worker import protocol as P  # noqa: E402

PRICE = 3600.0  # USD per hour of the simulated H100: a dollar a second
PRICED = ["--simulate-gpus=H100:1", f'--Ledger.prices={{"H100": {PRICE:g}, "cpu": 0}}']
BUDGET = 0.5
DAY = 86400.0

# A cell that sleeps until it is interrupted and says when it was (the worker's clock,
# the host's: workers of the process backend run beside the daemon).
SLEEPER = (
    "import time\nstarted = time.time()\nprint('started', flush=True)\n"
    "try:\n    time.sleep(120)\n"
    "except KeyboardInterrupt:\n    print('interrupted', repr(time.time()), repr(started), flush=True)\n    raise\n"
)


def run_sleeper(client: DaemonClient, session: str, content: dict, interrupt: bool) -> tuple[dict, float, float, float]:
    """One SLEEPER cell: (its cost record, interrupt time, cell's own start, INTERRUPT sent
    at, or 0) as unix times. ``interrupt``: the client interrupts it once it has started."""
    texts: list[str] = []
    sent = [0.0]

    def on_message(m: P.Message) -> None:
        if m.type == P.Msg.STREAM:
            texts.append(m.content["text"])
            if interrupt and m.content["text"].startswith("started") and not sent[0]:
                time.sleep(0.05)  # well inside the sleep
                sent[0] = time.time()
                client.send(P.Message(P.Msg.INTERRUPT, {}, session))

    msg = P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": SLEEPER, **content}, session)
    done = client.request(msg, on_message, timeout=60)
    [line] = [ln for ln in "".join(texts).splitlines() if ln.startswith("interrupted ")]
    _, at, started = line.split()
    return done.content["cost"], float(at), float(started), sent[0]


def enforcement(tmp: Path, runs: int) -> dict:
    d = start_daemon(tmp, *PRICED)
    client = DaemonClient(d.url, d.key)
    session = "bench-budget"
    out: dict = {"latency": [], "start_offset": [], "overshoot": [], "to_done": [], "user": [], "stopped": []}
    try:
        warm = P.Message(P.Msg.EXECUTE, {"gpu": "H100", "code": "pass"}, session)
        client.request(warm, timeout=60)  # the worker is started before the first budget's clock runs
        for _ in range(runs):
            cost, at, started, _ = run_sleeper(client, session, {"budget": BUDGET}, interrupt=False)
            cell_start = cost["at"] - cost["wall_s"]  # the daemon's own cell start, on its wall clock
            crossed = cell_start + BUDGET * 3600 / cost["price_per_hour"]
            out["latency"].append(at - crossed)
            out["start_offset"].append(started - cell_start)
            out["overshoot"].append(cost["usd"] - BUDGET)
            out["to_done"].append(cost["at"] - at)  # the traceback, the DONE, the billing
            out["stopped"].append(cost.get("stopped", ""))
            _, at, _, sent = run_sleeper(client, session, {}, interrupt=True)
            out["user"].append(at - sent)
        client.request(P.Message(P.Msg.RELEASE, {}, session), timeout=30)
        out["billed_log"] = d.log.wait_for(r"billed a cell the daemon stopped: .*", timeout=5, nth=runs).group(0)
    finally:
        client.close()
        d.stop()
    return out


# ----------------------------------------------------------------------------- ledger

GPUS = [
    ("H100", 2.99, 0.40),
    ("A100-80GB", 1.79, 0.22),
    ("H200", 3.79, 0.10),
    ("L40S", 0.99, 0.10),
    ("A10G", 0.75, 0.06),
    ("cpu", 0.0, 0.12),
]


def fill_ledger(path: str, n: int, now: float, seed: int = 14) -> dict:
    """``n`` records over 45 days, written as the daemon writes them (ledger_db.row), in
    time order and one transaction: 92% cells, 7% sessions' warm idle time, 1% the pool's."""
    rng = random.Random(seed)
    users = [f"user{i:02d}" for i in range(1, 21)]
    notebooks = []  # (user, path, device, count, first day back, days active, weight)
    for u in users:
        for j in range(rng.randint(30, 90)):
            device, _, _ = rng.choices(GPUS, [g[2] for g in GPUS])[0]
            count = rng.choices([1, 2, 4, 8], [0.8, 0.1, 0.07, 0.03])[0] if device != "cpu" else 0
            back = rng.uniform(0, 45)
            notebooks.append(
                (
                    u,
                    f"/home/{u}/proj{j % 7}/nb{j:03d}.ipynb",
                    device,
                    count,
                    back,
                    min(back, rng.choice([0.2, 1, 2, 3, 5, 8, 13])),
                    rng.paretovariate(1.2),
                )
            )
    weights = [nb[6] for nb in notebooks]
    prices = {g[0]: g[1] for g in GPUS}
    picks = rng.choices(range(len(notebooks)), weights, k=n)
    ats = sorted(
        (now - (nb[4] - rng.uniform(0, nb[5])) * DAY, i)
        for i, nb in ((i, notebooks[i]) for i in picks)  # a time inside the notebook's active days
    )
    sources = [f"{rng.getrandbits(64):016x}" for _ in range(5000)]

    def rows():
        for k, (at, i) in enumerate(ats):
            user, nb, device, count, _, _, _ = notebooks[i]
            session = f"s{i:05d}-{int(at // DAY)}"
            price = prices[device] * max(1, count)
            r = rng.random()
            if r < 0.01:
                record = {"kind": "pool", "user": ledger_db.POOL_USER, "notebook": "(warm pool)", "session": ""}
                seconds = rng.uniform(10, 600)
                yield ledger_db.row(
                    {
                        **record,
                        "at": at,
                        "day": ledger_db.day_of(at),
                        "device": device,
                        "count": count,
                        "seconds": seconds,
                        "usd": price * seconds / 3600,
                    }
                )
                continue
            base = {
                "user": user,
                "notebook": nb,
                "session": session,
                "at": at,
                "day": ledger_db.day_of(at),
                "device": device,
                "count": count,
            }
            if r < 0.08:
                seconds = rng.uniform(30, 1800)
                record = {
                    **base,
                    "kind": "idle",
                    "seconds": seconds,
                    "held_s": seconds * 3,
                    "usd": price * seconds / 3600,
                }
                yield ledger_db.row(record)
                continue
            wall = rng.lognormvariate(1.0, 1.6)
            held = wall * rng.uniform(1, 20)
            record = {
                **base,
                "kind": "cell",
                "simulated": False,
                "wall_s": wall,
                "seconds": wall,
                "usd": price * wall / 3600,
                "price_per_hour": price,
                "peak_memory_bytes": rng.randrange(1 << 30, 80 << 30) if device != "cpu" else None,
                "mean_util": rng.uniform(0, 100) if device != "cpu" else None,
                "energy_j": wall * rng.uniform(100, 700) if device != "cpu" else None,
                "session_held_s": held,
                "session_usd": price * held / 3600,
                "session_idle_s": held - wall,
                "session_idle_usd": price * (held - wall) / 3600,
                "request": f"{k:032x}",
                "spec": device if count <= 1 else f"{device}:{count}",
            }
            if rng.random() < 0.1:
                record["budget_usd"] = 5.0
            yield ledger_db.row(record, sources[k % len(sources)], record["spec"])

    # The table first and its indexes after the rows (one sort each rather than a million
    # inserts into each), no journal: the file ends as the daemon's own schema makes it
    # (the daemon's connection turns WAL on).
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(ledger_db.SCHEMA.split(";")[0] + ";")
        ledger_db.insert(db, rows())
        db.executescript(ledger_db.SCHEMA)
    finally:
        db.close()
    return {"users": len(users), "notebooks": len(notebooks)}


def private(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def cost_command(d, since: str = "30d") -> list[str]:
    return [
        str(Path(sys.executable).parent / "jupyter-gpu"),
        "--connection-file",
        d.connection_file,
        "cost",
        "--since",
        since,
        "--by",
        "notebook",
        "--all",
    ]


def timed_run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{cmd} failed: {p.stderr}")
    return took, p.stdout


def spend_once(client: DaemonClient, since: float) -> float:
    t = time.perf_counter()
    client.call(P.Msg.SPEND, {"since": since, "all": True, "by": "notebook"}, timeout=120)
    return time.perf_counter() - t


def ledger_query(tmp: Path, n: int, reps: int) -> dict:
    now = time.time()
    state = private(tmp / "state")
    path = str(state / "ledger.sqlite")
    t = time.perf_counter()
    shape = fill_ledger(path, n, now)
    out: dict = {**shape, "fill_s": time.perf_counter() - t, "db_mb": os.path.getsize(path) / 1e6}
    since = now - 30 * DAY
    db = sqlite3.connect(path)  # closed before the daemon starts: it turns WAL on, which wants the file alone
    out["in_window"] = db.execute("SELECT COUNT(*) FROM records WHERE at >= ?", (since,)).fetchone()[0]
    heavy = db.execute("SELECT user, COUNT(*) FROM records WHERE at >= ? GROUP BY user ORDER BY 2 DESC", (since,))
    out["heavy"] = heavy.fetchall()[0]
    db.close()
    out["plan"] = query_plan(path, since)
    empty_dir = private(tmp / "empty")
    d = start_daemon(tmp, f"--WorkerDaemon.state_dir={state}")
    e = start_daemon(empty_dir, f"--WorkerDaemon.state_dir={private(empty_dir / 'state')}")
    client = DaemonClient(d.url, d.key)
    try:
        for key, fn in {
            "cli": lambda: timed_run(cost_command(d))[0],
            "cli_empty": lambda: timed_run(cost_command(e))[0],
            "spend": lambda: spend_once(client, time.time() - 30 * DAY),
            "sqlite": lambda: sqlite_groups(path, time.time() - 30 * DAY),
            "one_user": lambda: sqlite_groups(path, time.time() - 30 * DAY, out["heavy"][0]),
        }.items():
            fn()  # the page cache warm, as on a host whose daemon has been answering
            out[key] = [fn() for _ in range(reps)]
        out["groups"] = len(ledger_db.read_groups(path, None, time.time() - 30 * DAY))
        out["sample"] = timed_run(cost_command(d))[1]
    finally:
        client.close()
        d.stop()
        e.stop()
    return out


def sqlite_groups(path: str, since: float, user: str | None = None) -> float:
    """The floor: the report's GROUP BY (ledger_db.read_groups) on the file, in this
    process, nothing around it."""
    t = time.perf_counter()
    ledger_db.read_groups(path, user, since)
    return time.perf_counter() - t


def query_plan(path: str, since: float) -> list[str]:
    """sqlite's plan for the statement ledger_db.groups runs."""
    db = sqlite3.connect(path)
    try:
        sent: list[str] = []
        db.set_trace_callback(sent.append)
        ledger_db.groups(db, None, since)
        db.set_trace_callback(None)
        return [r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + sent[-1])]
    finally:
        db.close()


# ----------------------------------------------------------------------------- round trip


def export(rev: str, into: Path) -> Path:
    """The daemon's and the client library's sources at ``rev`` (`git archive`: the
    checkout's git state is not touched)."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "kernel_worker", "jupyter_gpu"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


CONFIGS = (  # (name, gpu, extra EXECUTE content)
    ("H100, priced, $100 cell budget", "H100", {"budget": 100.0}),
    ("cpu, no budget", "cpu", {}),
)


def cpu_s(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (/proc, clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_trips(tmp: Path, before: str, after: str, cells: int, block: int) -> dict:
    """{(config, side): [seconds]}: empty EXECUTEs on warm sessions, blocks alternated.
    ``after``: a revision to run instead of this checkout."""
    old = export(before, tmp / "before")
    if after:
        new = export(after, tmp / "after-src")
        mine = start_daemon(private(tmp / "after"), *PRICED, prefix=("env", f"PYTHONPATH={new}"))
    else:
        mine = start_daemon(private(tmp / "after"), *PRICED)
    daemons = {
        f"{after}" if after else "this checkout": mine,
        f"before ({before})": start_daemon(private(tmp / "old"), *PRICED, prefix=("env", f"PYTHONPATH={old}")),
    }
    clients = {side: DaemonClient(d.url, d.key) for side, d in daemons.items()}
    out: dict = {}
    cpus: dict = {}

    def one(client: DaemonClient, msg_content: dict, session: str) -> float:
        t = time.perf_counter()
        done = client.request(P.Message(P.Msg.EXECUTE, msg_content, session), timeout=30)
        took = time.perf_counter() - t
        if not done.content.get("ok", True):
            raise SystemExit(f"an empty cell failed: {done.content}")
        return took

    plan = [
        (side, name, {"gpu": gpu, "code": "pass", **extra}, f"bench-money-{i}")
        for side in daemons
        for i, (name, gpu, extra) in enumerate(CONFIGS)
    ]
    try:
        for side, name, content, session in plan:  # warm: workers started, caches filled
            for _ in range(max(block, 100)):
                one(clients[side], content, session)
        for b in range(cells // block):
            order = plan if b % 2 == 0 else plan[::-1]
            for side, name, content, session in order:
                client, pid = clients[side], daemons[side].proc.pid
                cpu = cpu_s(pid)
                out.setdefault((name, side), []).extend(one(client, content, session) for _ in range(block))
                cpus[(name, side)] = cpus.get((name, side), 0.0) + cpu_s(pid) - cpu
        for side, name, content, session in plan:
            clients[side].request(P.Message(P.Msg.RELEASE, {}, session), timeout=30)
        out["cpu"] = {k: v / len(out[k]) for k, v in cpus.items()}
    finally:
        for c in clients.values():
            c.close()
        for d in daemons.values():
            d.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="budget-stopped cells (and user interrupts)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="ledger records")
    ap.add_argument("--reps", type=int, default=5, help="spend reports timed")
    ap.add_argument("--cells", type=int, default=2000, help="empty cells per configuration")
    ap.add_argument("--block", type=int, default=100, help="empty cells per block before switching")
    ap.add_argument("--before", default="8460dce^", help="the revision to compare the round trip with")
    ap.add_argument("--after", default="", help="a revision to run instead of this checkout's files")
    ap.add_argument("--only", default="enforcement,ledger,roundtrip", help="which tables")
    args = ap.parse_args()
    only = set(args.only.split(","))
    med = statistics.median
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}")
    with tempfile.TemporaryDirectory(prefix="jgpu-bench-money-") as tmp:
        if "enforcement" in only:
            e = enforcement(private(Path(tmp) / "budget"), args.runs)
            print(f"\n## Budget enforcement: a ${BUDGET:.2f} cell budget at ${PRICE / 3600:g}/s, {args.runs} runs")
            lat, user = e["latency"], e["user"]
            print_table(
                ("metric", "jupyter-gpu", "reference, same run", "target"),
                [
                    (
                        "spend crosses the budget -> KeyboardInterrupt in the cell, p50",
                        ms(med(lat)),
                        f"{ms(med(user))} (a user's INTERRUPT sent -> KeyboardInterrupt)",
                        "< 1 progress interval (1 s)",
                    ),
                    ("same, max", ms(max(lat)), f"{ms(max(user))} (same, max)", "< 1 s"),
                    (
                        "cell billed past its budget (the interrupt's own time), p50 / max",
                        f"${med(e['overshoot']):.4f} / ${max(e['overshoot']):.4f}",
                        "",
                        "",
                    ),
                    (
                        "KeyboardInterrupt in the cell -> its DONE billed, p50 / max",
                        f"{ms(med(e['to_done']))} / {ms(max(e['to_done']))}",
                        "",
                        "",
                    ),
                    (
                        "the cell's first line after the daemon's cell start, p50 / max",
                        f"{ms(med(e['start_offset']))} / {ms(max(e['start_offset']))}",
                        "",
                        "",
                    ),
                ],
            )
            print(
                f"# every run stopped by its budget: {all(e['stopped'])}; daemon log: {e['billed_log'].strip()[:160]}"
            )
        if "ledger" in only:
            q = ledger_query(private(Path(tmp) / "ledger"), args.rows, args.reps)
            print(
                f"\n## Spend report on a {args.rows:,}-record ledger ({q['db_mb']:.0f} MB, {q['users']} users, "
                f"{q['notebooks']} notebooks, 45 days; {q['in_window']:,} records and {q['groups']:,} groups in the "
                f"last 30 days; filled in {q['fill_s']:.0f} s), median of {args.reps}"
            )
            print_table(
                ("metric", "jupyter-gpu", "reference, same run", "target"),
                [
                    (
                        "`jupyter-gpu cost --since 30d --by notebook --all`, process start to exit",
                        ms(med(q["cli"])),
                        f"{ms(med(q['cli_empty']))} (the same command, empty ledger)",
                        "< 1 s",
                    ),
                    (
                        "SPEND request (30 days, by notebook, all users), client round trip",
                        ms(med(q["spend"])),
                        f"{ms(med(q['sqlite']))} (the same GROUP BY on the sqlite file, in this process)",
                        "",
                    ),
                ],
            )
            print("# query plan: " + "; ".join(q["plan"]))
            print(
                f"# one user's groups ({q['heavy'][0]}, the heaviest: {q['heavy'][1]:,} records in the window), "
                f"in this process: {ms(med(q['one_user']))}"
            )
            print("# first lines of the report:\n#   " + "\n#   ".join(q["sample"].splitlines()[:4]))
        if "roundtrip" in only:
            rt = round_trips(private(Path(tmp) / "rt"), args.before, args.after, args.cells, args.block)
            print(
                f"\n## Empty-cell round trip (EXECUTE `pass`, warm session, client library), {args.cells} cells "
                f"per row in alternated blocks of {args.block}"
            )
            cpu = rt.pop("cpu")
            sides = list(dict.fromkeys(side for _, side in rt))
            rows = []
            for name, _, _ in CONFIGS:
                after, before = rt[(name, sides[0])], rt[(name, sides[1])]
                rows.append((f"{name}: p50", ms(pct(after, 50)), ms(pct(before, 50))))
                rows.append((f"{name}: p99", ms(pct(after, 99)), ms(pct(before, 99))))
                rows.append(
                    (f"{name}: the daemon's CPU per cell", *(f"{cpu[(name, side)] * 1e6:.0f} µs" for side in sides))
                )
            print_table(("metric", f"jupyter-gpu ({sides[0]})", f"reference, same run: {sides[1]}"), rows)


if __name__ == "__main__":
    main()
