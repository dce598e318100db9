"""Scale to zero on a Slurm node that shares no filesystem with the daemon's host (#13 on
#15): an idle release writes the namespace on the node and sends its files over the
worker's socket into the daemon's store; the next job gets them back the same way and the
notebook's next cell reads its variables as before. A worker that sends files it should not
(the daemon's own record, a path, more than the quota) gets no snapshot, and nothing lands
outside the store."""

from __future__ import annotations

import glob
import os
import re
import signal
import threading
from pathlib import Path

from support.shells import run
from support.slurm_gateway import our_jobs, running_job
from test_snapshots import NAMESPACE, READ_BACK, READ_BACK_OUT, restored_note

from kernel_worker.daemon.paths import default_state_dir

IDLE = ("--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2")


def session_of(job: dict) -> str:
    return job["name"].rsplit("-", 1)[-1]


def test_an_idle_released_slurm_job_leaves_its_namespace_and_the_next_job_restores_it(gateway, make_shell, slurm):
    d = gateway(*IDLE)
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\n" + NAMESPACE + "import os\nfirst_job = os.environ['SLURM_JOB_ID']")[0].success
    first = running_job(slurm)
    d.log.wait_for(r"session \w+: snapshot \S+ \(\d+ names, \d+ bytes\)", timeout=60)
    d.log.wait_for(r"released: it was idle", timeout=30)
    slurm.wait_for("the idle job cancelled", lambda: not our_jobs(slurm))
    # The files came over the socket: the daemon's store has them, the node's copy is gone.
    [snap] = Path(default_state_dir(d.connection_file)).glob("snapshots/*/*/*/meta.json")
    names = sorted(os.listdir(snap.parent))
    assert "manifest.json" in names and any(n.endswith(".bin") for n in names), names
    assert glob.glob(f"/tmp/jupyter-gpu-{session_of(first)}-*") == []

    result, cap = run(ip, "%%gpu cpu\n" + READ_BACK + "\nprint(first_job != os.environ['SLURM_JOB_ID'])")
    assert result.success, cap.stdout
    assert cap.stdout == READ_BACK_OUT + "True\n"
    note = restored_note(cap)
    assert re.match(r"restored 14 names \(.*\) \(\d+\.\d MiB\) from the snapshot of \d\d:\d\d", note), note
    assert "2 large value(s) load when first read" in note
    result, cap = run(ip, "%%gpu cpu\nprint(total(), big.dtype, big.flags.writeable)")
    assert result.success and cap.stdout == f"{4 * 1024 * 1024}.0 float64 True\n", cap.stdout

    # `%gpu restore ID` into the idle worker: the same files, over the socket again.
    sid = snap.parent.name
    assert run(ip, "%%gpu cpu\nsmall = None")[0].success
    result, cap = run(ip, f"%gpu restore {sid}")
    assert result.success and cap.stdout.startswith("restored 14 names"), cap.stdout
    result, cap = run(ip, "%%gpu cpu\nprint(small.sum())")
    assert result.success and cap.stdout == "499500.0\n", cap.stdout


FORGE = """%%gpu cpu
import kernel_worker.filestream as F
from kernel_worker import protocol as P
honest = getattr(F, "honest", F.pieces)
F.honest = honest
def pieces(directory, of, session):       # what a hostile cell can make its worker send
    out, files = honest(directory, of, session)
    bad = {NAME: SIZE}
    for name, size in bad.items():
        out.append(P.Message(P.Msg.FILE, {"of": of, "name": name, "offset": 0, "size": size}, session,
                             parent=of, buffers=[b"x" * min(size, 16)]))
    files.update(bad)
    return out, files
F.pieces = pieces
"""


def test_a_worker_sending_files_it_should_not_gets_no_snapshot(gateway, make_shell, tmp_path):
    d = gateway("--Snapshots.quota_bytes=100000000")
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\nkept = 41")[0].success
    store = Path(default_state_dir(d.connection_file)) / "snapshots"
    for name, size, why in (
        ("meta.json", 16, "a file piece names 'meta.json', which is not a file it may write"),
        ("../escape", 16, "a file piece names '../escape', which is not a file it may write"),
        (".hidden", 16, "a file piece names '.hidden', which is not a file it may write"),
        ("huge.bin", 200_000_000, "more than the 100000000 bytes it may take"),
        ("short.bin", 32, "short.bin arrived with 16 of its 32 bytes"),
    ):
        assert run(ip, FORGE.replace("NAME", repr(name)).replace("SIZE", str(size)))[0].success
        result, cap = run(ip, "%gpu snapshot")
        assert not result.success
        assert why in str(result.error_in_exec), (name, result.error_in_exec)
        assert run(ip, "%gpu snapshots")[1].stdout.startswith("no snapshots"), name
        assert not list(store.glob("*/*/*/*")), "a refused snapshot leaves nothing in the store"
        assert not (store.parent / "escape").exists() and not list(store.glob("**/escape"))
    assert run(ip, "%%gpu cpu\nimport kernel_worker.filestream as F\nF.pieces = F.honest")[0].success
    result, cap = run(ip, "%gpu snapshot")
    assert result.success and cap.stdout.startswith("snapshot "), cap.stdout
    result, cap = run(ip, "%%gpu cpu\nprint(kept + 1)")
    assert result.success and cap.stdout == "42\n"


STALL = """%%gpu cpu
import os, time
import kernel_worker.filestream as F
honest = F.pieces
def pieces(directory, of, session):   # the first piece leaves, then the rest waits for the test
    out, files = honest(directory, of, session)
    def stalled():
        yield out[0]
        while not os.path.exists(GO):
            time.sleep(0.05)
        yield from out[1:]
    return stalled(), files
F.pieces = pieces
kept = 41
"""


def test_a_daemon_killed_while_a_snapshots_files_arrive_leaves_no_half_snapshot(gateway, make_shell, slurm, tmp_path):
    d = gateway()
    ip = make_shell(d)
    go = tmp_path / "go"
    assert run(ip, STALL.replace("GO", repr(str(go))))[0].success
    store = Path(default_state_dir(d.connection_file)) / "snapshots"
    said = []
    taking = threading.Thread(target=lambda: said.append(run(ip, "%gpu snapshot")), daemon=True)
    taking.start()
    slurm.wait_for("the first file of the snapshot in the store", lambda: list(store.glob("*/*/*/*")))
    assert not list(store.glob("*/*/*/meta.json"))
    d.kill()
    d2 = gateway()
    d2.log.wait_for(r"adopted the running worker of session", timeout=60)
    d2.log.wait_for(r"removing snapshot \S+, left half written by a daemon that stopped", timeout=10)
    assert not list(store.glob("*/*/*")), "the half-written snapshot is gone"
    go.touch()  # the worker's files now go to a daemon that never asked for them: dropped, said
    d2.log.wait_for(r"dropped a file piece its worker sent unasked", timeout=60)
    taking.join(timeout=60)  # the request died with the daemon that had it: said, not waited on forever
    assert not taking.is_alive()
    [(result, _)] = said
    assert "restarted and will not answer this snapshot" in str(result.error_in_exec), result.error_in_exec
    result, cap = run(ip, "%%gpu cpu\nprint(kept + 1)")
    assert result.success and cap.stdout == "42\n", cap.stdout
    assert run(ip, "%gpu snapshots")[1].stdout.startswith("no snapshots")


def test_a_worker_killed_while_it_sends_a_snapshot_leaves_no_half_snapshot(gateway, make_shell, slurm, tmp_path):
    d = gateway()
    ip = make_shell(d)
    go = tmp_path / "go"  # never made: the worker's send stays held after its first piece
    cell = STALL.replace("GO", repr(str(go))) + "print(os.getpid())\n"
    result, cap = run(ip, cell)
    assert result.success, result.error_in_exec
    pid = int(cap.stdout.strip())
    store = Path(default_state_dir(d.connection_file)) / "snapshots"
    said = []
    taking = threading.Thread(target=lambda: said.append(run(ip, "%gpu snapshot")), daemon=True)
    taking.start()
    slurm.wait_for("the first file of the snapshot in the store", lambda: list(store.glob("*/*/*/*")))
    os.kill(pid, signal.SIGKILL)
    taking.join(timeout=60)  # the daemon's request ends with its worker, not after Snapshots.timeout
    assert not taking.is_alive()
    [(result, _)] = said
    assert re.fullmatch(
        r"no snapshot: the session's worker ended while writing it \(.*killed by SIGKILL.*\)", str(result.error_in_exec)
    ), result.error_in_exec
    # the half-sent snapshot is removed; the session went with its worker, so the notebook's
    # next session starts fresh (its marker is all that is left)
    assert [p.name for p in store.glob("*/*/*")] == ["fresh"]
    slurm.wait_for("the killed worker's job gone", lambda: not our_jobs(slurm))
    result, cap = run(ip, "%%gpu cpu\nprint('a new job')")
    assert result.success and cap.stdout == "a new job\n", result.error_in_exec
