"""The workspace sync against plain copies of the same tree, measured in one run on this machine.

    python bench/sync.py [--files 1000] [--mb 200] [--reps 20] [--first 3] [--dir DIR]

Makes a directory of FILES files (MB megabytes of random bytes in all, 10 per
subdirectory), then measures, on this host and in one temporary directory under DIR
(default /dev/shm: tmpfs measures the engine, not the disk; ext4 on this VM's virtual
disk varied 3x from run to run for a plain write loop):

- the first sync into an empty workspace on the same host, as the magic makes it there
  (a docker worker): ``WorkdirSync.scan(keep=False)`` (every file hashed, nothing kept) +
  ``Workspaces.have`` + ``plan`` + ``Workspaces.apply`` with ``Local`` (every file copied
  by the daemon from the notebook's directory), beside ``shutil.copytree`` of the same tree
  (reference); and the same with the bytes in memory, as from another host: ``scan`` +
  ``have`` + ``plan`` + ``contents`` + ``apply`` (every file written);
- an unchanged sync: the same calls with nothing to send, p50 over REPS runs, beside
  ``os.walk`` + ``os.lstat`` of every file (reference: the least any stat-based check costs).

- through a real daemon (``python -m kernel_worker``, ipc socket) and the magic's own
  ``WorkdirWire``: the first sync on the same host (``local``: two SYNC requests, the
  daemon copies every file) and as bytes (every file a frame of the second request, as
  from another host), each best of FIRST into a fresh workspace; then on the same host an
  unchanged tree (a scan equal to the last manifest: no request at all) and one file
  changed (two requests, that file alone), p50 over REPS.

The page cache is warm for every row (the tree was just written). A file's hash is cached
only once its mtime is ``RACY_NS`` old, so the unchanged runs start after that much time.
Prints one table. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from figures import gbps, ms, pct, print_table  # noqa: E402

from jupyter_gpu.client import DaemonClient  # noqa: E402
from jupyter_gpu.workdir import RACY_NS, WorkdirSync, notebook_key  # noqa: E402
from jupyter_gpu.workdir_wire import WorkdirWire  # noqa: E402
from kernel_worker.workspace import Local, Workspaces  # noqa: E402

MB = 1000 * 1000
USER = "bench"


def make_tree(root: str, files: int, total: int) -> int:
    size, written = total // files, 0
    blob = os.urandom(size + files)  # each file a different slice: no two alike
    for i in range(files):
        d = os.path.join(root, f"d{i // 10:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
            written += f.write(blob[i : i + size])
    return written


def sync(w: WorkdirSync, ws: Workspaces, src: str, key: str, local: bool) -> tuple[int, int, list[float]]:
    """One whole sync, as the magic and the daemon will run it (``local``: the daemon on
    the notebook's host copies the files). Returns (files hashed, files sent or copied,
    seconds spent in scan / have + plan / contents / apply)."""
    t0 = time.perf_counter()
    m = w.scan(src, keep=not local)
    t1 = time.perf_counter()
    send = w.plan(m, ws.have(USER, key))
    t2 = time.perf_counter()
    files = {} if local else w.contents(m, send)
    t3 = time.perf_counter()
    done = ws.apply(
        USER, key, m.entries, files, Local(m.root, *m.root_id, {r: m.stats[r] for r in send}) if local else None
    )
    t4 = time.perf_counter()
    assert not done.get("need"), done
    return m.hashed, len(send), [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def walk_stat(root: str) -> int:
    n = 0
    for d, _, names in os.walk(root):
        for name in names:
            os.lstat(os.path.join(d, name))
            n += 1
    return n


def wire_rows(src: str, tmp: str, reps: int, nbytes: int, first: int) -> list[tuple]:
    """The magic's sync through a real daemon: first (same host, and as bytes), then on
    the same host unchanged and one file changed."""
    cf = os.path.join(tmp, "daemon.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel_worker", "--print-ready", f"--WorkerDaemon.connection_file={cf}",
         f"--WorkerDaemon.url=ipc://{tmp}/daemon.sock", f"--WorkerDaemon.bulk_root={tmp}/bulk",
         f"--WorkerDaemon.state_dir={tmp}/state", f"--Workspaces.root={tmp}/wire-workspaces",
         "--WorkerDaemon.max_message_bytes=4294967296"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        if not select.select([proc.stdout], [], [], 30)[0]:
            raise RuntimeError("the daemon did not start")
        url = json.loads(proc.stdout.readline())["url"]
        with open(cf) as f:
            client = DaemonClient(url, json.load(f)["key"].encode())
        local = client.bulk_root() is not None  # as the magic tells: the daemon shares this host
        assert local, "the daemon's bulk directory is not readable here"
        firsts: dict[bool, list[float]] = {True: [], False: []}
        for i in range(first):  # alternated, each into a fresh workspace with a fresh stat cache
            for how in (True, False):
                wire, key = WorkdirWire(WorkdirSync()), notebook_key(os.path.join(src, f"wire{i}{how}.ipynb"))
                t = time.perf_counter()
                wire.push(lambda m: client.request(m, timeout=600), (url,), "bench", key, src, how)
                firsts[how].append(time.perf_counter() - t)
                assert wire.stats["files"] > 0 and wire.stats["copied"] == (wire.stats["files"] if how else 0)
                shutil.rmtree(next(Path(tmp, "wire-workspaces").glob(f"*/{key}")))  # tmpfs is memory

        def push() -> float:
            t = time.perf_counter()
            wire.push(lambda m: client.request(m, timeout=600), (url,), "bench", key, src, True)
            return time.perf_counter() - t

        wire, key = WorkdirWire(WorkdirSync()), notebook_key(os.path.join(src, "wire.ipynb"))
        push()
        time.sleep(RACY_NS / 1e9 + 0.05)
        push()  # caches the hashes the first scan found too fresh
        before = dict(wire.stats)
        unchanged = [push() for _ in range(reps)]
        assert wire.stats["requests"] == before["requests"], "an unchanged tree sent a request"
        changed = []
        target = next(os.path.join(d, n) for d, _, ns in os.walk(src) for n in ns)
        for i in range(reps):
            with open(target, "r+b") as f:
                f.write(i.to_bytes(4, "little"))
            changed.append(push())
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return [
        (
            f"wire: first sync through a real daemon (ipc), same host: 2 requests, files copied, best of {first}",
            gbps(nbytes, min(firsts[True])),
            "-",
            ">= 1 GB/s",
        ),
        (
            f"wire: first sync, files as frames (as from another host), 2 requests, best of {first}",
            gbps(nbytes, min(firsts[False])),
            "-",
            "",
        ),
        (f"wire: unchanged tree, p50 of {reps} (0 requests)", ms(pct(unchanged, 50)), "-", "< 5 ms"),
        (f"wire: one file changed, p50 of {reps} (2 requests, 1 file copied)", ms(pct(changed, 50)), "-", ""),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--first", type=int, default=3, help="first syncs (and copytrees) to take the best of")
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    ap.add_argument("--dir", default=shm, help="where the trees are made (default /dev/shm, else the temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="jgpu-sync-bench-", dir=args.dir) as tmp:
        src = os.path.join(tmp, "notebook")
        nbytes = make_tree(src, args.files, args.mb * MB)
        made = time.time_ns()
        ws = Workspaces(root=os.path.join(tmp, "workspaces"))
        copies, firsts, bytes_firsts = [], [], []
        for i in range(args.first):  # alternated, each into a fresh place; best of each reported
            t = time.perf_counter()
            shutil.copytree(src, os.path.join(tmp, "copy"))
            copies.append(time.perf_counter() - t)
            shutil.rmtree(os.path.join(tmp, "copy"))
            for local, out in ((False, bytes_firsts), (True, firsts)):  # the same-host one last: kept
                w, key = WorkdirSync(), notebook_key(os.path.join(src, f"bench{i}{local}.ipynb"))
                ws.path(USER, key)  # the workspace exists before the first sync (made when the session starts)
                t = time.perf_counter()
                hashed, sent, parts = sync(w, ws, src, key, local)
                out.append((time.perf_counter() - t, parts))
                assert hashed == sent == args.files, (hashed, sent, args.files)
                if i < args.first - 1 or not local:
                    shutil.rmtree(ws.path(USER, key))
        first_s, first_parts = min(firsts)
        bytes_s, bytes_parts = min(bytes_firsts)
        copy_s = min(copies)

        time.sleep(max(0.0, (made + RACY_NS - time.time_ns()) / 1e9 + 0.05))
        sync(w, ws, src, key, True)  # hashes the files the first sync found too fresh to cache
        runs, walks, parts, rehashed = [], [], [], 0
        for _ in range(args.reps):  # alternated with the reference, so both meet the same machine
            t = time.perf_counter()
            walk_stat(src)
            walks.append(time.perf_counter() - t)
            t = time.perf_counter()
            h, s, p = sync(w, ws, src, key, True)
            runs.append(time.perf_counter() - t)
            parts.append(p)
            rehashed += h + s
        wired = wire_rows(src, tmp, args.reps, nbytes, args.first)
    split = [statistics.median(p[i] for p in parts) for i in range(4)]
    rows = [
        (
            f"first sync, same host, {args.files} files / {nbytes / MB:.0f} MB, all hashed and copied, "
            f"best of {args.first}",
            gbps(nbytes, first_s),
            gbps(nbytes, copy_s) + " (shutil.copytree)",
            ">= 1 GB/s",
        ),
        ("  of which scan / have+plan / contents / apply", " / ".join(ms(x) for x in first_parts), "-", ""),
        (
            f"first sync, bytes in memory (as from another host), all hashed, read and written, best of {args.first}",
            gbps(nbytes, bytes_s),
            gbps(nbytes, copy_s),
            "",
        ),
        ("  of which scan / have+plan / contents / apply", " / ".join(ms(x) for x in bytes_parts), "-", ""),
        (
            f"unchanged sync, p50 of {args.reps} ({rehashed} files hashed or sent)",
            ms(pct(runs, 50)),
            ms(pct(walks, 50)) + " (os.walk + lstat)",
            "< 5 ms",
        ),
        ("unchanged sync, p99", ms(pct(runs, 99)), ms(pct(walks, 99)), ""),
        (
            "unchanged, notebook side only (scan), p50",
            ms(pct([p[0] for p in parts], 50)),
            ms(pct(walks, 50)) + " (os.walk + lstat)",
            "",
        ),
        (
            "  of which scan / have+plan / contents / apply, p50",
            " / ".join(ms(x) for x in split),
            "-",
            "",
        ),
        *wired,
    ]
    head = ("metric", "workspace sync", "reference, same run", "target")
    where = args.dir or tempfile.gettempdir()
    print(f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, trees in {where}, warm page cache")
    print_table(head, rows)


if __name__ == "__main__":
    main()
