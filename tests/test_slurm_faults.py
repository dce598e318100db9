"""Faults of the Slurm gateway, each at a point the test reaches for certain, and what the
notebook's user sees after them:

- the daemon SIGKILLed in the middle of a 64 MiB value's chunk stream, either way: the
  notebook reaches its gateway through a ``Splice`` (tests/support/slurm_gateway.py) that
  lets 16 MiB through and then nothing, so the daemon has a quarter of the stream and
  never the rest when it dies;
- the daemon SIGKILLed while a worker waits for its workspace (the worker is stopped with
  the cell in its socket, so its question goes out only once the daemon is dead), and
  while a cell's files are on their way back (the daemon is stopped until they are in its
  socket);
- the daemon frozen, then killed, with the notebook's ping in its socket;
- the next cell sent to a restarted daemon before its adopted worker is back (the flake
  of test_the_mirror_survives_a_daemon_restart, made certain);
- another Unix user's Slurm jobs named exactly like ours.

After each, the next cell works with exactly the values it should, and squeue holds none
of the daemon's jobs (the ``gateway`` fixture)."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
from support.shells import notes, run
from support.slurm import slurm_cluster
from support.slurm_gateway import (
    Background,
    Splice,
    our_jobs,
    patient_shell,
    spy,
    unread_by,
    unread_on,
    worker_facts,
)

DEADLINE_S = 60
BIG = 8 << 20  # int64s: 64 MiB, a stream of 16 chunks of 4 MiB
CUT = 16 << 20  # what reaches the other end of the stream before its daemon dies
PULL_LOST = (  # a pull whose daemon died, asked about before its worker is back (the daemon's words) or after
    r"the jupyter-gpu daemon restarted and session \w+ was not running this request any more: its output after "
    r"the restart is lost\. Run the cell again; `%gpu status` shows the session"
    r"|the jupyter-gpu daemon at ipc://\S+ restarted and will not answer this pull: this daemon does not know the "
    r"request\. Output after this point is lost; the remote cell may or may not have finished\. Run it again "
    r"\(`%gpu status` shows the session\)"
)
STRANGER = "jgpu-stranger"
SLEEPER = "#!/bin/sh\nexec sleep 600\n"


NOT_WHOLE = (
    "a value sent back by the worker did not arrive whole (its daemon restarted while it was being sent?): "
    "pull it again with %gpu pull NAME"
)


@pytest.fixture(scope="module")
def slurm():
    """This module's cluster, under a directory another user may enter (0711): their sbatch
    reads slurm.conf and reaches munged's socket, as on a login node."""
    base = tempfile.mkdtemp(prefix="jgpu-slurm-faults-")
    os.chmod(base, 0o711)
    try:
        with slurm_cluster(Path(base)) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def splice(tmp_path):
    s = Splice(tmp_path, f"ipc://{tmp_path}/daemon.sock")  # the gateway's address, the same after a restart
    yield s
    s.close()


@pytest.fixture(scope="module")
def stranger_user():
    """A second Unix user (made here if absent, and then removed after)."""
    try:
        pwd.getpwnam(STRANGER)
        made = False
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", STRANGER], check=True
        )
        made = True
    yield STRANGER
    if made:
        subprocess.run(["userdel", STRANGER], check=True)


@pytest.fixture
def stranger(slurm, stranger_user):
    """``submit(name, *sbatch_args)``: a job of the second user, sleeping; each is
    cancelled by its id afterwards."""
    jobs = []

    def submit(name: str, *args: str) -> str:
        options = (f"--job-name={name}", "--output=/dev/null", "--chdir=/tmp", *args)
        jobs.append(slurm.sbatch_as(stranger_user, *options, script=SLEEPER))
        return jobs[-1]

    yield submit
    if jobs:
        slurm.scancel(*jobs)
        for job in jobs:
            slurm.wait_gone(job)


def shown(cap) -> list[str]:
    return [o.data["text/plain"] for o in cap.outputs]


# ---------------------------------------------------------------------- chunk streams


def test_a_daemon_killed_while_a_notebook_streams_a_value_to_its_worker(
    gateway, make_shell, splice, notebook_dir, slurm
):
    d = gateway()
    ip = patient_shell(make_shell, types.SimpleNamespace(connection_file=splice.connection_file(d)))
    _, job, _ = worker_facts(ip)
    local = np.arange(BIG, dtype=np.int64)
    assert run(ip, f"import numpy as np\nbig = np.arange({BIG}, dtype=np.int64)")[0].success
    splice.hold("up", CUT)
    restarted: dict = {}

    def crash_mid_stream():
        assert splice.held.wait(DEADLINE_S)
        slurm.wait_for("the daemon holding what reached it", lambda: splice.unread_upstream() == 0)
        d.kill()
        splice.release()
        restarted["d"] = gateway()

    t = Background(crash_mid_stream)
    result, cap = run(
        ip, "%%gpu cpu\nimport hashlib\nprint(hashlib.sha256(big).hexdigest(), os.environ['SLURM_JOB_ID'])"
    )
    t.join()
    assert result.success, result.error_in_exec
    assert (cap.stdout, cap.stderr) == (f"{hashlib.sha256(local).hexdigest()} {job}\n", "")
    assert [line[:5] for line in shown(cap)] == ["⏱ cpu"]
    restarted["d"].log.wait_for(r"adopted the running worker of session")
    result, cap = run(ip, "%%gpu cpu --pull twice\ntwice = big * 2\nprint(int(twice[-1]))")
    assert result.success and cap.stdout == f"{2 * (BIG - 1)}\n", result.error_in_exec
    assert np.array_equal(ip.user_ns["twice"], local * 2)


@pytest.mark.parametrize("how", ["--pull", "%gpu pull"])
def test_a_daemon_killed_while_a_worker_streams_a_value_back(gateway, make_shell, splice, notebook_dir, how):
    d = gateway()
    ip = patient_shell(make_shell, types.SimpleNamespace(connection_file=splice.connection_file(d)))
    result, _ = run(ip, f"%%gpu cpu\nimport numpy as np\nback = np.arange({BIG}, dtype=np.int64) * 3")
    assert result.success, result.error_in_exec
    splice.hold("down", CUT)
    restarted: dict = {}

    def crash_mid_stream():
        assert splice.held.wait(DEADLINE_S)
        d.kill()
        splice.release()
        restarted["d"] = gateway()

    t = Background(crash_mid_stream)
    result, cap = run(ip, "%%gpu cpu --pull back\nback = back + 1" if how == "--pull" else "%gpu pull back")
    t.join()
    assert not result.success and "back" not in ip.user_ns
    error = str(result.error_in_exec)
    if how == "--pull":  # the cell ran; its reply came again from the worker's journal, its value did not
        assert error == NOT_WHOLE
        expected = np.arange(BIG, dtype=np.int64) * 3 + 1
    else:  # a pull's answer is not journaled: the restarted daemon says it will not come
        assert re.fullmatch(PULL_LOST, error), error
        expected = np.arange(BIG, dtype=np.int64) * 3
    result, cap = run(ip, "%gpu pull back")
    assert result.success, result.error_in_exec
    assert np.array_equal(ip.user_ns["back"], expected)


# ---------------------------------------------------------------------- the workspace mirror


@pytest.mark.timeout(90)
def test_a_daemon_killed_while_a_worker_waits_for_its_workspace(gateway, make_shell, notebook_dir, slurm):
    """The restarted daemon knows the session's workspace (from its record) and answers
    the question its worker asks again once it is back."""
    d = gateway()
    ip = patient_shell(make_shell, d)
    pid, job, _ = worker_facts(ip)
    (notebook_dir / "data" / "x.csv").write_text("a,b\n7,8\n")
    os.kill(pid, signal.SIGSTOP)  # the cell reaches it; its question leaves only once the daemon is dead
    restarted: dict = {}

    def crash_while_it_waits():
        try:
            slurm.wait_for("the cell in its worker's socket", lambda: unread_by(pid) > 0, DEADLINE_S)
            d.kill()
        finally:
            os.kill(pid, signal.SIGCONT)
        restarted["d"] = gateway()

    t = Background(crash_while_it_waits)
    result, cap = run(ip, "%%gpu cpu\nprint(open('data/x.csv').read().splitlines()[1], os.environ['SLURM_JOB_ID'])")
    t.join()
    assert result.success, result.error_in_exec
    assert (cap.stdout, cap.stderr) == (f"7,8 {job}\n", "")
    assert [line[:5] for line in shown(cap)] == ["⏱ cpu"]
    result, cap = run(ip, "%%gpu cpu\nprint(open('data/x.csv').read())")
    assert result.success and cap.stdout == "a,b\n7,8\n\n"


def test_a_daemon_killed_while_a_cell_sends_its_files_back(gateway, make_shell, notebook_dir, tmp_path, slurm):
    """The daemon is stopped with the cell's files on their way into it, then killed; the
    worker sends them again to the restarted daemon, whose reply to the cell waits for them."""
    d = gateway()
    ip = patient_shell(make_shell, d)
    _, _, port = worker_facts(ip)
    mark, go, size = tmp_path / "mark", tmp_path / "go", 16000
    cell = (
        f"%%gpu cpu\nimport time\n_ = open('made.txt', 'w').write('m' * {size})\nopen({str(mark)!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\nprint('wrote')"
    )
    restarted: dict = {}

    def crash_while_they_arrive():
        slurm.wait_for("the cell writing", mark.exists, DEADLINE_S)
        os.kill(d.proc.pid, signal.SIGSTOP)
        go.touch()
        slurm.wait_for("its files in the daemon's socket", lambda: unread_on(port) >= size, DEADLINE_S)
        d.kill()
        restarted["d"] = gateway()

    t = Background(crash_while_they_arrive)
    result, cap = run(ip, cell)
    t.join()
    assert result.success and (cap.stdout, cap.stderr) == ("wrote\n", ""), result.error_in_exec
    result, cap = run(ip, "%gpu fetch made.txt")
    assert result.success and cap.stdout == "fetched 1 file into nb: made.txt\n", result.error_in_exec
    assert (notebook_dir / "made.txt").read_text() == "m" * size


def test_a_notebook_asks_again_when_its_ping_died_with_a_frozen_daemon(
    gateway, make_shell, splice, notebook_dir, tmp_path, slurm, monkeypatch
):
    """A daemon frozen (SIGSTOP) while a cell runs silently takes the notebook's next ping
    into its socket and dies with it; the notebook pings again, so the restarted daemon
    answers, and the cell's output comes when it is done (not "lost contact")."""
    d = gateway()
    ip = patient_shell(make_shell, types.SimpleNamespace(connection_file=splice.connection_file(d)))
    assert ip.run_cell("%config GPUMagics.heartbeat_timeout = 30.0").success
    _, job, _ = worker_facts(ip)
    mark, go = tmp_path / "mark", tmp_path / "go"
    pinged, answered = spy(monkeypatch, "_send_ping"), spy(monkeypatch, "_pong")
    restarted: dict = {}

    def freeze_then_crash():
        try:
            slurm.wait_for("the cell running", mark.exists, DEADLINE_S)
            os.kill(d.proc.pid, signal.SIGSTOP)
            pinged.clear()
            assert pinged.wait(DEADLINE_S)  # the notebook's next ping ...
            slurm.wait_for("the ping unread", lambda: splice.unread_upstream() > 0)  # ... in the frozen daemon
            answered.clear()
            d.kill()
            restarted["d"] = gateway()
            assert answered.wait(DEADLINE_S), "the notebook never heard from the restarted daemon"
        finally:
            go.touch()

    t = Background(freeze_then_crash)
    cell = (
        f"%%gpu cpu\nimport time\nopen({str(mark)!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\nprint('done', os.environ['SLURM_JOB_ID'])"
    )
    result, cap = run(ip, cell)
    t.join()
    assert result.success and (cap.stdout, cap.stderr) == (f"done {job}\n", ""), result.error_in_exec


def test_a_cell_sent_before_its_adopted_worker_is_back_gets_its_files(gateway, make_shell, notebook_dir, monkeypatch):
    """The next cell reaches the restarted daemon before the adopted worker does (it is
    stopped until the daemon has answered a ping sent after the cell). The worker then
    sends its last cell's reply again: that reply must not end this cell's wait for the
    files it writes (test_the_mirror_survives_a_daemon_restart, failing once in a while)."""
    d = gateway()
    ip = patient_shell(make_shell, d)
    pid, job, _ = worker_facts(ip)
    os.kill(pid, signal.SIGSTOP)  # it cannot dial the restarted daemon until the cell waits there
    d.kill()
    try:
        d2 = gateway()
        d2.log.wait_for(r"adopted the running worker of session", timeout=DEADLINE_S)
    except BaseException:
        os.kill(pid, signal.SIGCONT)
        raise
    (notebook_dir / "data" / "x.csv").write_text("a,b\n7,8\n")
    # the answer to a ping that followed the cell on its socket: the daemon has the cell
    has_the_cell = spy(monkeypatch, "_pong", lambda msg, content: msg.type == "execute" and content.get("known"))

    def resume():
        try:
            assert has_the_cell.wait(DEADLINE_S)
        finally:
            os.kill(pid, signal.SIGCONT)

    t = Background(resume)
    cell = (
        "%%gpu cpu\nprint(open('data/x.csv').read().splitlines()[1], os.environ['SLURM_JOB_ID'])\n"
        "_ = open('made.txt', 'w').write('m')"
    )
    result, cap = run(ip, cell)
    t.join()
    assert result.success and cap.stdout == f"7,8 {job}\n", result.error_in_exec
    assert notes(cap) == ["1 file created or changed in the workspace (made.txt): `%gpu fetch` brings them back"]
    result, cap = run(ip, "%gpu fetch made.txt")
    assert result.success and (notebook_dir / "made.txt").read_text() == "m", result.error_in_exec


# ---------------------------------------------------------------------- another user's jobs


def test_another_users_jobs_named_like_ours_are_never_adopted_signalled_or_cancelled(
    gateway, make_shell, slurm, stranger, notebook_dir
):
    """Another user reads our jobs' names in squeue and names theirs the same, even with
    our session's id. The daemon lists only the jobs of its own uid: here its environment
    says USER and LOGNAME are that other user (as ``sudo -E`` or ``su -m`` leave them),
    and still it adopts, signals and cancels only its own job."""
    spoof = ("env", f"USER={STRANGER}", f"LOGNAME={STRANGER}")
    d = gateway(prefix=spoof)
    ip = patient_shell(make_shell, d)
    result, cap = run(ip, "%%gpu H100\nimport os\na = 41\nprint(os.environ['SLURM_JOB_ID'])")
    assert result.success, result.error_in_exec
    job = cap.stdout.strip()
    (ours,) = our_jobs(slurm)
    assert ours["id"] == job
    prefix, session = ours["name"].rsplit("-", 1)
    assert session == ip.magics_manager.registry["GPUMagics"].session_id
    twin = stranger(ours["name"], "--gres=gpu:h100:1")  # our name, our session's id
    other = stranger(f"{prefix}-{'0' * 31}1")  # our daemon's prefix, a session it never had
    for theirs in (twin, other):
        slurm.wait_state(theirs, "RUNNING")
    d.kill()
    d2 = gateway(prefix=spoof)
    d2.log.wait_for(rf"adopted the running worker of session {session}", timeout=DEADLINE_S)
    result, cap = run(ip, "%%gpu H100\nprint(a + 1, os.environ['SLURM_JOB_ID'])")
    assert result.success and cap.stdout == f"42 {job}\n", result.error_in_exec
    result, cap = run(ip, "%%gpu H100 --timeout 1\nimport time\ntime.sleep(60)")
    assert type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    assert "passed --timeout 1 s" in cap.stderr
    result, cap = run(ip, "%%gpu H100\nprint(a, os.environ['SLURM_JOB_ID'])")
    assert result.success and cap.stdout == f"41 {job}\n", result.error_in_exec
    assert run(ip, "%gpu release")[0].success
    slurm.wait_gone(job)
    for theirs in (twin, other):
        fields = slurm.job(theirs)
        assert (fields["JobState"], fields["UserId"].split("(")[0]) == ("RUNNING", STRANGER), fields
    said = "".join(d.log.lines + d2.log.lines)
    assert not re.search(rf"job ({twin}|{other})\b|leftover|not adopting", said), said


def test_another_users_job_named_like_ours_keeps_its_place_and_is_never_cancelled(
    gateway, make_shell, slurm, stranger, notebook_dir
):
    """Places in Slurm's queue count every user's pending jobs, each by its id: another
    user's job named exactly like our pending one is ahead of it, not it; and a restarted
    daemon, which cancels the pending job it cannot vouch for, cancels ours only."""
    d = gateway("--WorkerDaemon.worker_start_timeout=600")
    ip = patient_shell(make_shell, d)
    assert ip.run_cell("%config GPUMagics.heartbeat_timeout = 5.0").success
    assert run(ip, "%%gpu cpu\nprint('cpu')")[0].success
    (ours,) = our_jobs(slurm)
    session = ours["name"].rsplit("-", 1)[1]
    blocker = slurm.sbatch("--gres=gpu:h100:2", "--output=/dev/null", script=SLEEPER)
    slurm.wait_state(blocker, "RUNNING")
    twin = stranger(ours["name"], "--gres=gpu:h100:1")
    slurm.wait_state(twin, "PENDING")
    seen: dict = {}

    def kill_once_ours_waits_behind_theirs():
        d.log.wait_for(r"waits: pending in Slurm: Priority, 2nd of 2 in partition gpu", timeout=DEADLINE_S)
        seen["pending"] = next(j for j in our_jobs(slurm) if j["state"] == "PENDING")
        d.kill()
        seen["d"] = gateway()

    t = Background(kill_once_ours_waits_behind_theirs)
    result, cap = run(ip, "%%gpu H100\nprint('never')")
    t.join()
    assert not result.success and "never" not in cap.stdout
    assert "[jupyter-gpu] waiting for H100: pending in Slurm: Priority, 2nd of 2 in partition gpu" in shown(cap)
    assert all(line.endswith(", 2nd of 2 in partition gpu") for line in shown(cap)), shown(cap)
    assert "restarted and will not answer this execute" in str(result.error_in_exec), result.error_in_exec
    seen["d"].log.wait_for(rf"removing leftover worker of session {session}", timeout=DEADLINE_S)
    slurm.wait_gone(seen["pending"]["id"])
    fields = slurm.job(twin)
    assert (fields["JobState"], fields["UserId"].split("(")[0]) == ("PENDING", STRANGER), fields
    slurm.scancel(blocker)
    slurm.wait_state(twin, "RUNNING")
    result, cap = run(ip, "%%gpu H100\nimport os\nprint(os.environ['SLURM_JOB_ID'])")
    assert result.success, result.error_in_exec
    assert [j["id"] for j in our_jobs(slurm)] == [cap.stdout.strip()] and cap.stdout.strip() != twin
