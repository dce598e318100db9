"""Scale to zero without losing the namespace, as a notebook user sees it: a worker
released for being idle comes back with its variables (a large one loaded when first
read), across a daemon killed with its workers, within a per-user quota; a snapshot that
cannot be read gives a fresh namespace and says why; another user cannot restore it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support.orphans import stop_workers, worker_pids
from support.shells import notes, run

from kernel_worker import protocol as P
from kernel_worker.daemon.paths import default_state_dir

IDLE = ("--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2")
NAMESPACE = """\
import numpy as np, pandas as pd
import numpy.linalg as la
small = np.arange(1000, dtype=np.float64)
big = np.ones(4 * 1024 * 1024)                      # 32 MiB: restored when first read
frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
offset = 1
class Model:
    def __init__(self, w):
        self.w = w
    def predict(self, x):
        return x * self.w + offset
model = Model(3)
def make_adder(k):
    def add(x):
        return x + k
    return add
add5 = make_adder(5)
def total():
    return big.sum()                                 # a function that reads the large one
handle = open("/dev/null")
squares = (i * i for i in range(3))
"""
READ_BACK = (
    "print(small.sum(), frame.b.tolist(), model.predict(2), add5(1), la.norm(np.ones(4)), "
    "'handle' in globals(), 'squares' in globals())"
)
READ_BACK_OUT = "499500.0 ['x', 'y', 'z'] 7 6 2.0 False False\n"


def restored_note(cap) -> str:
    [note] = [n for n in notes(cap) if n.startswith("restored ") or "could not be restored" in n]
    return note


def test_an_idle_release_keeps_the_namespace_and_the_next_cell_restores_it(daemon_factory, make_shell):
    d = daemon_factory(*IDLE)
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\n" + NAMESPACE)[0].success
    d.log.wait_for(r"session \w+: snapshot \S+ \(\d+ names, \d+ bytes\)", timeout=60)
    d.log.wait_for(r"released: it was idle", timeout=30)
    result, cap = run(ip, "%%gpu cpu\n" + READ_BACK)
    assert result.success, cap.stdout
    assert cap.stdout == READ_BACK_OUT
    note = restored_note(cap)
    assert re.fullmatch(
        r"restored 12 names \(.*\) \(\d+\.\d MiB\) from the snapshot of \d\d:\d\d in \d+\.\d s; "
        # two large values: big, and total (which reads it, so the two are kept together)
        r"2 large value\(s\) load when first read; not kept: handle \(.+\); squares \(.+\)",
        note,
    ), note
    # The large value comes in when a cell (here through a function) first reads it; the
    # notebook's functions read the namespace as they did before the snapshot.
    result, cap = run(
        ip, "%%gpu cpu\nprint(total(), big.dtype)\noffset = 10\nprint(model.predict(2), big is globals()['big'])"
    )
    assert result.success and cap.stdout == f"{4 * 1024 * 1024}.0 float64\n16 True\n"
    cost = run(ip, "%gpu cost")[1].stdout  # snapshot and restore time apart from the cells'
    assert re.search(r"^  snapshot: \d+\.\d\d s, \$0\.0000$", cost, re.M) and re.search(
        r"^  restore: \d+\.\d\d s, \$0\.0000$", cost, re.M
    ), cost


def test_fresh_starts_empty_and_a_plain_release_is_not_restored(daemon_factory, make_shell):
    d = daemon_factory(*IDLE)
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\nkept = 41")[0].success
    d.log.wait_for(r"released: it was idle", timeout=30)
    result, cap = run(ip, "%%gpu cpu --fresh\nprint('kept' in globals())")
    assert result.success and cap.stdout == "False\n"
    d.stop()
    d = daemon_factory()  # no idle release now: only the releases below
    ip = make_shell(d)
    for kept in (42, 43):  # two snapshots within a second: the newer is restored
        assert run(ip, f"%%gpu cpu\nkept = {kept}")[0].success
        assert run(ip, "%gpu snapshot")[1].stdout.startswith("snapshot ")
    run(ip, "%gpu release")  # on purpose, without --keep: the next worker starts empty
    result, cap = run(ip, "%%gpu cpu\nprint('kept' in globals())")
    assert result.success and cap.stdout == "False\n"
    assert run(ip, "%%gpu cpu\nkept = 44")[0].success
    result, cap = run(ip, "%gpu release --keep")
    assert "its namespace was snapshotted" in cap.stdout
    result, cap = run(ip, "%%gpu cpu\nprint(kept + 1)")
    assert result.success and cap.stdout == "45\n"
    result, cap = run(ip, "%gpu restore " + run(ip, "%gpu snapshots")[1].stdout.splitlines()[-1].split()[0])
    assert result.success and cap.stdout.startswith("restored 1 name (kept)")
    result, cap = run(ip, "%%gpu cpu\nprint(kept)")  # the oldest of the three listed, newest first
    assert result.success and cap.stdout == "42\n"


def test_a_snapshot_survives_a_daemon_killed_with_its_workers(daemon_factory, make_shell):
    d = daemon_factory()
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\n" + NAMESPACE)[0].success
    result, cap = run(ip, "%gpu snapshot")
    assert re.match(r"snapshot \d{8}-\d{6}-[0-9a-f]{6}: 12 names \(", cap.stdout), cap.stdout
    assert "not kept: handle: " in cap.stdout and "not kept: squares: " in cap.stdout
    assert worker_pids(d.connection_file)
    d.kill()
    stop_workers(d.connection_file)  # the host went down: daemon and worker both gone
    d = daemon_factory()
    result, cap = run(ip, "%%gpu cpu\n" + READ_BACK)
    assert result.success and cap.stdout == READ_BACK_OUT
    assert restored_note(cap).startswith("restored 12 names")


def test_the_quota_deletes_the_oldest_snapshot_with_a_note(daemon_factory, make_shell):
    d = daemon_factory("--Snapshots.quota_bytes=50000000")
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\nimport numpy as np\nblock = np.ones(4 * 1024 * 1024)")[0].success  # 32 MiB
    first = run(ip, "%gpu snapshot")[1].stdout.split(":")[0].split()[1]
    result, cap = run(ip, "%gpu snapshot")
    assert re.search(rf"deleted snapshot {first} of .* \(3\d\.\d MB\) to stay under the snapshot quota", cap.stdout), (
        cap.stdout
    )
    listed = run(ip, "%gpu snapshots")[1].stdout
    assert first not in listed and len(listed.strip().splitlines()) == 1


def test_a_corrupt_snapshot_gives_a_fresh_namespace_and_says_why(daemon_factory, make_shell, tmp_path):
    d = daemon_factory()
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\nkept = 1")[0].success
    sid = run(ip, "%gpu snapshot")[1].stdout.split(":")[0].split()[1]
    [manifest] = Path(default_state_dir(d.connection_file)).glob(f"snapshots/*/*/{sid}/manifest.json")
    manifest.write_text("{not json")
    run(ip, "%gpu release")
    result, cap = run(ip, f"%gpu restore {sid}")
    assert cap.stdout == f"the next %%gpu cell starts from snapshot {sid}\n"
    result, cap = run(ip, "%%gpu cpu\nprint('kept' in globals())")
    assert result.success and cap.stdout == "False\n"
    assert re.fullmatch(
        rf"snapshot {sid} could not be restored \(.+\): this cell runs in a fresh namespace", restored_note(cap)
    )


def test_another_user_cannot_list_or_restore_a_snapshot(daemon_factory, tmp_path):
    from support.curve import curve_users

    from jupyter_gpu.client import DaemonClient, DaemonError

    kd, server_pub, users = curve_users(tmp_path, ("alice", "bob"))
    d = daemon_factory(
        "--url=tcp://127.0.0.1:0",
        "--WorkerDaemon.curve=True",
        "--WorkerDaemon.single_tenant=True",
        f"--WorkerDaemon.keys_dir={kd}",
    )
    alice, bob = (DaemonClient(d.url, b"", curve=(server_pub, *users[n])) for n in ("alice", "bob"))
    d.clients += [alice, bob]
    cell = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": "secret = 'alice'", "notebook": "nb.ipynb"}, "alice-nb")
    assert alice.request(cell, timeout=60).content["ok"]
    taken = alice.call(P.Msg.SNAPSHOT, {"op": "take", "notebook": "nb.ipynb"}, session="alice-nb")
    for session in ("alice-nb", "bob-nb"):  # alice's session is not bob's; his own has nothing
        with pytest.raises(DaemonError) as e:
            bob.call(P.Msg.SNAPSHOT, {"op": "restore", "id": taken["id"], "notebook": "nb.ipynb"}, session=session)
        assert e.value.code in (P.Err.NO_SESSION, P.Err.SNAPSHOT), e.value
        assert "secret" not in str(e.value) and "nb.ipynb" not in str(e.value)
    assert bob.call(P.Msg.SNAPSHOT, {"op": "list", "notebook": "nb.ipynb"}, session="bob-nb") == {"snapshots": []}
    alice_dir = next(Path(default_state_dir(d.connection_file)).glob("snapshots/alice"))
    assert alice_dir.stat().st_mode & 0o777 == 0o700
    meta = json.loads(next(alice_dir.glob(f"*/{taken['id']}/meta.json")).read_text())
    assert meta["names"] == ["secret"]


def test_a_docker_workers_namespace_comes_back_after_an_idle_release(engine, daemon_factory, make_shell):
    from support.daemons import docker_args

    d = daemon_factory(*docker_args(engine, *IDLE))
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\n" + NAMESPACE)[0].success
    d.log.wait_for(r"released: it was idle", timeout=60)
    result, cap = run(ip, "%%gpu cpu\n" + READ_BACK + "\nprint(total())")
    assert result.success, cap.stdout
    assert cap.stdout == READ_BACK_OUT + f"{4 * 1024 * 1024}.0\n"
    assert restored_note(cap).startswith("restored 12 names")


EVIL_WRITER = """\
import json, os
import kernel_worker.snapshot as S
def write(items, directory, fingerprints=None, **kw):  # what a hostile cell can make its worker write
    os.mkfifo(os.path.join(directory, "0.pkl"))          # a reader that opened it would wait forever
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"format": 1, "names": {}, "left": {}, "bytes": 0}, f)
    return {"names": {}, "left": {}, "bytes": 0}
S.write = write
"""


def test_a_hostile_workers_snapshot_stage_never_hangs_the_daemon(engine, daemon_factory, make_shell, tmp_path):
    from support.daemons import docker_args

    d = daemon_factory(*docker_args(engine))
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\n" + EVIL_WRITER)[0].success
    result, cap = run(ip, "%gpu snapshot")  # the FIFO is skipped, never opened for reading
    assert result.success and cap.stdout.startswith("snapshot "), cap.stdout
    bulk = Path(str(tmp_path)) / "bulk"
    assert not list(bulk.glob("*/snapshot-*")), "the worker's stage is removed once copied"
    result, cap = run(ip, "%%gpu cpu\nprint('still served')")
    assert result.success and cap.stdout == "still served\n"


def test_the_quota_never_deletes_a_snapshot_a_worker_still_reads(daemon_factory, make_shell):
    d = daemon_factory("--Snapshots.quota_bytes=50000000")
    a, b = make_shell(d), make_shell(d)
    assert run(a, "%%gpu cpu\nimport numpy as np\nbig = np.ones(4 * 1024 * 1024)")[0].success  # 33.6 MB
    run(a, "%gpu release --keep")
    result, cap = run(a, "%%gpu cpu\nx = 1")  # restored; big stays on disk until read
    assert "1 large value(s) load when first read" in restored_note(cap)
    assert run(b, "%%gpu cpu\nimport numpy as np\nother = np.ones(4 * 1024 * 1024)")[0].success
    result, cap = run(b, "%gpu snapshot")  # 67 MB of snapshots: past the quota, but a's is in use
    assert result.success and "deleted snapshot" not in cap.stdout, cap.stdout
    result, cap = run(a, "%%gpu cpu\nprint(big.sum())")
    assert result.success and cap.stdout == f"{4 * 1024 * 1024}.0\n"
