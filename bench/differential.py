"""The differential run on the whole corpus (tests/differential/corpus.txt): each notebook
headless twice as it is, then with every code cell under `%%gpu any` against a real daemon
on each backend (process; docker, where the notebook's directory is synced to a
workspace); every cell steady between the two local runs must show the same under %%gpu.

    python bench/differential.py [--backends process,docker] [--only SUBSTRING[,SUBSTRING...]]
                                 [--json FILE] [--local FILE]

Prints one row a notebook and backend, the totals, and each mismatch with its diff. Exits 1
when a steady cell does not match.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import differential as D  # noqa: E402
from support.daemons import docker_args, start_daemon  # noqa: E402
from support.logs import LogWatcher  # noqa: E402
from support.orphans import forget_daemon  # noqa: E402

DAEMON_ARGS = ("--simulate-gpus=H100:1", "--WorkerDaemon.worker_heartbeat_interval=0.5")


def notebook_packages(engine) -> list[str]:  # noqa: ANN001
    """The docker backend with the notebook's own packages in its workers, read-only, the
    way an operator shares a package directory (``DockerBackend.extra_mounts``): this venv's
    site-packages and its ``share/jupyter`` (the packages' data files: nbconvert's
    templates), each at the path it has here, so a message that names a module's file names
    the same file as in the local run."""
    site = sysconfig.get_paths()["purelib"]
    data = os.path.join(sys.prefix, "share", "jupyter")
    return docker_args(
        engine,
        f"--DockerBackend.extra_mounts={site}:{site}:ro",
        f"--DockerBackend.extra_mounts={data}:{data}:ro",
        f"--DockerBackend.extra_env=PYTHONPATH={site}",
        f"--DockerBackend.extra_env=JUPYTER_PATH={data}",
        notebook_libs=False,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="process,docker")
    ap.add_argument("--only", default="", help="notebooks whose name contains this (or any of these, comma-separated)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument(
        "--local",
        default="",
        help="keep the local runs in this file and reuse those found there (iterating on the %%%%gpu side only)",
    )
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]

    t_all = time.monotonic()
    sources, excludes = D.read_corpus()
    entries, skipped = D.collect(sources, excludes)
    only = [o for o in args.only.split(",") if o] or [""]
    entries = [e for e in entries if any(o in e.name for o in only)]
    print(f"corpus: {len(entries)} notebooks from {len(sources)} releases ({len(skipped)} left out)", flush=True)

    t0 = time.monotonic()
    kept = D.load_local(Path(args.local)) if args.local else {}
    local = {}
    for e in entries:
        if e.name in kept:
            local[e.name] = kept[e.name]
            continue
        local[e.name] = kept[e.name] = D.run_local(e)
        print(f"  local x2 {time.monotonic() - t0:6.1f} s  {e.name}", flush=True)
        if args.local:
            D.save_local(Path(args.local), kept)

    results: dict[str, list[D.Result]] = {}
    engine = None
    try:
        for backend in backends:
            extra: list[str] = []
            if backend == "docker":
                from support import dockerd

                engine = dockerd.start_engine(LogWatcher)
                dockerd.ensure_images(engine.client, engine.url)
                extra = notebook_packages(engine)
            tmp = Path(tempfile.mkdtemp(prefix=f"jgpu-diff-{backend}-"))
            os.environ["JUPYTER_RUNTIME_DIR"] = str(tmp / "runtime")
            daemon = start_daemon(tmp, *DAEMON_ARGS, *extra)
            try:
                out = results[backend] = []
                for e in entries:
                    r = D.compare(e, local[e.name], D.run_gpu(e, daemon.connection_file), f"%%gpu ({backend})")
                    out.append(r)
                    print(
                        f"  {backend:7} {r.seconds:6.1f} s  {e.name}: {r.steady}/{r.cells} steady, {r.matching} match",
                        flush=True,
                    )
            finally:
                daemon.stop()
                forget_daemon(daemon.connection_file)
    finally:
        if engine is not None:
            engine.stop()

    print()
    print("| notebook | cells | steady | " + " | ".join(f"match ({b})" for b in backends) + " |")
    print("|---|---:|---:|" + "---:|" * len(backends))
    for i, e in enumerate(entries):
        rs = [results[b][i] for b in backends]
        print(f"| {e.name} | {rs[0].cells} | {rs[0].steady} | " + " | ".join(str(r.matching) for r in rs) + " |")
    tot = {
        b: (sum(r.cells for r in results[b]), sum(r.steady for r in results[b]), sum(r.matching for r in results[b]))
        for b in backends
    }
    b0 = backends[0]
    print(
        f"| **total ({len(entries)} notebooks)** | {tot[b0][0]} | {tot[b0][1]} | "
        + " | ".join(str(tot[b][2]) for b in backends)
        + " |"
    )
    print(f"\nruntime {time.monotonic() - t_all:.0f} s")
    for name, why in skipped:
        print(f"left out: {name}: {why}")
    bad = 0
    for b in backends:
        for r in results[b]:
            if r.mismatches or r.notes:
                print(f"\n[{b}] " + D.report(r))
            bad += len(r.mismatches)
    if args.json:
        Path(args.json).write_text(json.dumps({b: [asdict(r) for r in results[b]] for b in backends}, indent=1))
    print(f"\n{bad} mismatching steady cells")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
