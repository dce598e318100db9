"""Snapshots around a daemon's graceful stop, as a notebook user sees them: the daemon
stopped with SIGTERM (an operator's restart) writes the notebook's snapshot before its
workers go, and the next daemon on the same state directory brings the variables back
in the next cell; ``%gpu restore`` without an id takes the newest snapshot, into the
idle worker now or into the next one after a release."""

from __future__ import annotations

import re

from support.orphans import worker_pids
from support.shells import notes, run

RESTORED = r"restored {names} \(\d+ B\) from the snapshot of \d\d:\d\d in \d+\.\d s"


def magics(ip):
    return ip.magics_manager.registry["GPUMagics"]


def test_a_graceful_daemon_stop_snapshots_the_notebook_and_the_next_daemon_restores_it(daemon_factory, make_shell):
    d = daemon_factory()
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\nimport numpy as np\na = 41\narr = np.arange(5)")[0].success
    sid = magics(ip).session_id
    d.stop()  # SIGTERM (tests/support/procs.stop_process): a graceful stop
    assert d.proc.returncode == 0, d.proc.returncode  # it exited by itself, not killed after the grace
    d.log.wait_for(rf"session {sid} ending: the daemon shut down", timeout=10)
    snap = d.log.wait_for(rf"session {sid}: snapshot (\S+) \(3 names, \d+ bytes\)", timeout=10)[1]
    d.log.wait_for(rf"session {sid} released: the daemon shut down", timeout=10)
    assert worker_pids(d.connection_file) == []  # its worker is gone: nothing to adopt, only the snapshot
    d = daemon_factory()  # the same state directory
    result, cap = run(ip, "%%gpu cpu\nprint(a + 1, arr.sum(), np.__name__)")
    assert result.success and cap.stdout == "42 10 numpy\n", (result.error_in_exec, cap.stdout)
    assert any(re.fullmatch(RESTORED.format(names=r"3 names \(a, arr, np\)"), n) for n in notes(cap)), notes(cap)
    assert run(ip, "%gpu snapshots")[1].stdout.split()[0] == snap


def test_restore_without_an_id_takes_the_newest_snapshot(daemon_factory, make_shell):
    d = daemon_factory()
    ip = make_shell(d)
    result, cap = run(ip, "%gpu restore")  # nothing yet
    assert not result.success
    assert str(result.error_in_exec) == "this notebook has no snapshot to restore (`%gpu snapshots` lists them)"
    taken = []
    for a in (1, 2):
        assert run(ip, f"%%gpu cpu\na = {a}")[0].success
        out = run(ip, "%gpu snapshot")[1].stdout
        assert re.match(r"snapshot \S+: 1 name \(a\)", out), out
        taken.append(out.split(":")[0].split()[1])
    assert run(ip, "%%gpu cpu\na = 3")[0].success
    # Into the idle worker, now: the newest (a = 2), not the oldest, and not what the worker holds.
    result, cap = run(ip, "%gpu restore")
    assert result.success and re.fullmatch(RESTORED.format(names=r"1 name \(a\)") + "\n", cap.stdout), cap.stdout
    result, cap = run(ip, "%%gpu cpu\nprint(a)")
    assert result.success and cap.stdout == "2\n"
    # After a plain release, into the next worker: the cell that reads it is not refused.
    assert run(ip, "%%gpu cpu\na = 4")[0].success
    run(ip, "%gpu release")
    result, cap = run(ip, "%gpu restore")
    assert cap.stdout == f"the next %%gpu cell starts from snapshot {taken[1]}\n"
    result, cap = run(ip, "%%gpu cpu\nprint(a)")
    assert result.success and cap.stdout == "2\n", (result.error_in_exec, cap.stdout)
    assert any(re.fullmatch(RESTORED.format(names=r"1 name \(a\)"), n) for n in notes(cap)), notes(cap)
