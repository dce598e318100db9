"""Load, bounded: 8 real kernels (nbclient, ipykernel) run real notebooks of ``%%gpu`` cells
at once against one daemon with 4 simulated GPUs, so 4 of them wait in the GPU queue.
Nothing may be lost or land in another notebook or cell, and the queue must be served in
order. The notebooks, the gates that make the kernels run at once and the checks are
``bench/load.py``'s (``make bench-load`` runs them at N = 8..64, with timings)."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
from support.paths import ROOT

_spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
load = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = load  # its dataclasses look their module up there
_spec.loader.exec_module(load)

N, GPUS, CELLS = 8, 4, 10
WAIT = 300  # seconds for any one wait (a kernel's start, a cell, a gate): generous, never a sleep


@pytest.mark.timeout(900)
def test_eight_kernels_at_once_lose_no_output_and_the_gpu_queue_is_served_in_order(
    daemon_factory, runtime_dir, tmp_path, monkeypatch
):
    d = daemon_factory(*load.daemon_args(GPUS))
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", d.connection_file)

    r = load.run_load(load.GPU_MODEL, N, CELLS, tmp_path / "run", d.proc.pid, GPUS, WAIT)

    assert r["errors"] == []
    assert r["outputs"] == {
        "lost": 0,
        "duplicated": 0,
        "misrouted": 0,
        "out_of_order": 0,
        "tokens": N * CELLS * len(load.PARTS),
    }
    # Every cell's first output line carries its dispatch time: all N * CELLS of them came back.
    assert len(r["dispatch_first"]) == N and len(r["dispatch"]) == N * (CELLS - 1)
    # The gates keep every GPU held until all 8 requests are in: 4 hold, 4 queue at places 1..4,
    # and each queued cell's "in queue" line counts down one place at a time to 1st.
    places = sorted((me.positions for me in r["kernels"] if me.positions), key=lambda p: p[0])
    assert places == [list(range(p, 0, -1)) for p in range(1, N - GPUS + 1)], places
    assert r["queue"]["in_order"], r["queue"]
    # A queued cell's queue line ends as its cost line, which says how long it waited (when
    # 0.05 s or more: surely so for the last one served).
    assert len(r["waited"]) == N - GPUS and max(r["waited"]) > 0, r["waited"]
    assert d.proc.poll() is None, "the daemon died under load"
    assert not [ln for ln in d.log.lines if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", ln)], "".join(
        d.log.lines[-40:]
    )
