"""Snapshot write and restore of a 1 GiB numpy namespace (kernel_worker/snapshot.py), beside
a plain np.save/np.load of the same arrays in the same run, and the lazy path: reading one
small name out of that 1 GiB snapshot.

    python bench/snapshot.py [--reps N] [--arrays K] [--mib M] [--dir DIR]

Runs alternate (snapshot first, then numpy first) and the median is printed. Both sides
write to the same filesystem (DIR, by default a temporary directory under /tmp, where the
daemon's state lives when $XDG_RUNTIME_DIR is unset). Writes are measured with fsync of
every file (what a snapshot does: it must survive a host crash) and without. Reads are
measured cold (dirty pages synced and the page cache dropped first, when running as root)
and warm (the files just read once). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from figures import gbps, ms, print_table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernel_worker import snapshot  # noqa: E402


def filesystem(path: str) -> str:
    """The type of the filesystem ``path`` lives on (the longest mount point above it)."""
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype, *_ = line.split()
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return f"{kind} ({'memory' if kind in ('tmpfs', 'ramfs') else 'disk'}) at {best}"


def drop_caches() -> bool:
    """Sync dirty pages, then drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def np_save(arrays: dict[str, np.ndarray], d: str, sync: bool) -> None:
    for name, a in arrays.items():
        with open(os.path.join(d, name + ".npy"), "wb") as f:
            np.save(f, a)
            if sync:
                f.flush()
                os.fsync(f.fileno())


def np_load(names: list[str], d: str) -> dict[str, np.ndarray]:
    return {n: np.load(os.path.join(d, n + ".npy")) for n in names}


def snap_load(d: str, names: list[str]) -> dict:
    values, failed = snapshot.load(d, snapshot.read_manifest(d), names)
    assert not failed, failed
    return values


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def fresh(root: str, name: str) -> str:
    d = os.path.join(root, name)
    shutil.rmtree(d, ignore_errors=True)
    os.mkdir(d, 0o700)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--arrays", type=int, default=8)
    ap.add_argument("--mib", type=int, default=128, help="size of each array")
    ap.add_argument("--dir", default="/tmp", help="where the files go (a temporary directory inside it)")
    ap.add_argument("--raw", action="store_true", help="also print every sample (seconds)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": rng.random(args.mib * 2**20 // 8) for i in range(args.arrays)}
    names = list(arrays)
    total = sum(a.nbytes for a in arrays.values())
    namespace = {**arrays, "small": {"lr": 3e-4, "epochs": 10}, "np": np}
    t: dict[str, list[float]] = {}
    dropped = True
    with tempfile.TemporaryDirectory(prefix="jgpu-bench-snapshot-", dir=args.dir) as root:
        for rep in range(args.reps):
            sides = ["snapshot", "numpy"] if rep % 2 == 0 else ["numpy", "snapshot"]
            for sync in (True, False):
                for side in sides:
                    d = fresh(root, side)
                    os.sync()  # untimed: no dirty pages of an earlier step are written back during this one
                    if side == "snapshot":
                        took, _ = timed(lambda: snapshot.write(namespace, d, sync=sync))
                    else:
                        took, _ = timed(lambda: np_save(arrays, d, sync))
                    t.setdefault(f"write {side} {sync}", []).append(took)
            for temp in ("cold", "warm"):
                if temp == "warm":
                    # Untimed: on this VM the first large allocation after the cold phase
                    # runs up to 10x slower, whichever side makes it (seen as a 5:4 split
                    # following the order); both sides first read once, then are timed.
                    snap_load(os.path.join(root, "snapshot"), names)
                    np_load(names, os.path.join(root, "numpy"))
                for side in sides:
                    d = os.path.join(root, side)
                    if temp == "cold":
                        dropped = drop_caches() and dropped
                    load = (lambda: snap_load(d, names)) if side == "snapshot" else (lambda: np_load(names, d))
                    took, got = timed(load)
                    t.setdefault(f"read {side} {temp}", []).append(took)
                    if rep == 0 and temp == "cold":
                        assert all(np.array_equal(got[n], arrays[n]) for n in names)
                    del got
            dropped = drop_caches() and dropped
            took, small = timed(lambda: snap_load(os.path.join(root, "snapshot"), ["small"]))
            assert small == {"small": namespace["small"]}
            t.setdefault("lazy", []).append(took)
        where = filesystem(root)
    med = {k: statistics.median(v) for k, v in t.items()}
    if args.raw:
        for k, v in t.items():
            print(f"# {k}: " + " ".join(f"{x:.3f}" for x in v))

    def cell(key: str) -> str:
        lo, hi = total / max(t[key]) / 1e9, total / min(t[key]) / 1e9
        return f"{gbps(total, med[key])}; {lo:.1f}-{hi:.1f}"

    def row(what: str, a: str, b: str, target: str) -> tuple:
        return (what, cell(a), cell(b), f"{med[a] / med[b]:.2f}x", target)

    cache = "page cache dropped before each" if dropped else "page cache NOT dropped (not root)"
    rows = [
        row("write, fsync of every file", "write snapshot True", "write numpy True", "≥ 1 GB/s, ≤ 1.5x"),
        row("write, no fsync", "write snapshot False", "write numpy False", ""),
        row(f"restore (all names), cold: {cache}", "read snapshot cold", "read numpy cold", "≥ 1 GB/s, ≤ 1.5x"),
        row("restore (all names), warm: files in the page cache", "read snapshot warm", "read numpy warm", ""),
        (f"lazy: read_manifest + load(['small']) from the {total / 2**30:.1f} GiB snapshot, cold",
         ms(med["lazy"]), "", "", "tiny (< 100 ms)"),
    ]  # fmt: skip
    print(
        f"# {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, numpy {np.__version__}, "
        f"{args.arrays} x {args.mib} MiB float64 arrays ({total / 2**30:.2f} GiB), {args.reps} alternated reps, "
        f"median (median time; slowest-fastest GB/s); files on {where}"
    )
    print_table(("metric", "snapshot", "np.save / np.load, same run", "ratio", "target"), rows)


if __name__ == "__main__":
    main()
