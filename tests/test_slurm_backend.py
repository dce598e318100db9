"""The notebook-level suite through a real Slurm (#15): `jupyter gpu daemon --backend slurm`
in front of the one-node cluster of tests/support/slurm.py. Every session is a Slurm job
placed by Slurm's scheduler; its executor dials back over CURVE tcp with its session's
key pair; no shared filesystem is assumed (no bulk files, no workspace paths). Checked:
closures and streaming, GPUs as Slurm allocated them, a request Slurm can never satisfy,
queueing behind another job with Slurm's reason and place, interrupt (``--timeout``),
idle release (job cancelled), ``scancel`` mid-cell, a daemon SIGKILLed and restarted
adopting the running job, and Slurm's time limit with its warning. After every test,
``squeue`` lists none of the daemon's jobs."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

from support import kernels
from support.shells import notes, run
from support.slurm_gateway import our_jobs, running_job
from support.workdir_story import check_sync_round_trip

from kernel_worker import protocol as P
from kernel_worker.daemon.mirror import FILES_PER_ANSWER

DEADLINE_S = 60
FILES = FILES_PER_ANSWER  # a workspace mirror's batch


def test_a_session_is_a_slurm_job_with_the_gpus_slurm_allocated(gateway, make_shell, slurm):
    d = gateway()
    ip = make_shell(d)
    assert run(ip, "a = 41\ndef f(x):\n    return x + 1")[0].success
    cell = (
        "%%gpu H100\nimport os, sys, time\n"
        "for i in range(3):\n    print('line', i, flush=True)\n"
        "env = os.environ\n"
        "print(f(a), env['SLURM_JOB_ID'], env['CUDA_VISIBLE_DEVICES'], env['JUPYTER_GPU_BULK_DIR'] == '')"
    )
    result, cap = run(ip, cell)
    assert result.success, (result.error_in_exec, cap.stderr)
    lines = cap.stdout.splitlines()
    assert lines[:3] == ["line 0", "line 1", "line 2"]
    answer, job_id, devices, no_bulk = lines[3].split()
    assert (answer, devices, no_bulk) == ("42", "0", "True")  # Slurm's allocation; values inline
    (job,) = our_jobs(slurm)
    assert (job["id"], job["state"], job["gres"]) == (job_id, "RUNNING", "gres:gpu:h100:1")
    assert re.fullmatch(r"jgpu-[0-9a-f]{12}-\S+", job["name"])
    status = d.client().call(P.Msg.STATUS)
    assert [g["model"] for g in status["gpus"]] == ["A100", "H100", "H100"]  # what sinfo declares
    # a large value travels over the socket (no shared filesystem): 8 MiB there and back
    result, cap = run(ip, "import numpy as np\nbig = np.arange(1 << 20)\n%gpu push big")
    assert result.success, cap.stderr
    result, cap = run(ip, "%%gpu H100 --pull big2\nbig2 = big * 2")
    assert result.success, cap.stderr
    assert ip.user_ns["big2"][-1] == 2 * ((1 << 20) - 1)
    result, cap = run(ip, "%gpu release")
    assert result.success
    slurm.wait_gone(job_id)


def test_a_request_slurm_can_never_satisfy_fails_at_once(gateway, make_shell, slurm):
    ip = make_shell(gateway())
    t0 = time.monotonic()
    result, cap = run(ip, "%%gpu H100:3\nprint('never')")
    assert not result.success and "never" not in cap.stdout
    assert "cannot provide 'H100:3': it has A100:1, H100:2, cpu" in str(result.error_in_exec)
    assert time.monotonic() - t0 < 10 and not our_jobs(slurm)


def test_a_cell_waits_in_slurms_queue_with_its_reason_and_place(gateway, make_shell, slurm):
    d = gateway()
    ip = make_shell(d)
    blocker = slurm.sbatch("--gres=gpu:h100:2", "--output=/dev/null", script="#!/bin/sh\nexec sleep 600\n")
    slurm.wait_state(blocker, "RUNNING")

    def free_once_ours_waits() -> None:
        # The daemon logs the queue line as it sends it; the cell's start comes after it.
        d.log.wait_for(r"waits: pending in Slurm: Resources, 1st of 1 in partition gpu", timeout=DEADLINE_S)
        slurm.scancel(blocker)

    t = threading.Thread(target=free_once_ours_waits)
    t.start()
    result, cap = run(ip, "%%gpu H100:2\nimport os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])")
    t.join(DEADLINE_S)
    assert result.success and cap.stdout == "0,1\n", cap.stderr
    shown = [o.data["text/plain"] for o in cap.outputs]
    assert "[jupyter-gpu] waiting for H100:2: pending in Slurm: Resources, 1st of 1 in partition gpu" in shown
    assert shown[-1].startswith("⏱ H100 ×2")
    assert any(re.fullmatch(r"waited \d+\.\d s in the queue", n) for n in notes(cap))


def test_interrupt_reaches_the_cell_through_slurm_and_the_session_stays(gateway, make_shell):
    ip = make_shell(gateway())
    assert run(ip, "%%gpu cpu\nkept = 'yes'")[0].success
    result, cap = run(ip, "%%gpu cpu --timeout 1\nimport time\ntime.sleep(60)")
    assert type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    assert "passed --timeout 1 s" in cap.stderr
    result, cap = run(ip, "%%gpu cpu\nprint(kept)")
    assert result.success and cap.stdout == "yes\n"


def test_idle_release_cancels_the_job(gateway, make_shell, slurm):
    d = gateway("--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2", "--Snapshots.on_idle_release=False")
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nimport os\nprint(os.environ['SLURM_JOB_ID'])")
    assert result.success
    job_id = cap.stdout.strip()
    d.log.wait_for(r"released: it was idle for more than 1 s", timeout=DEADLINE_S)
    slurm.wait_gone(job_id)
    assert slurm.job(job_id).get("JobState") in (None, "CANCELLED")


def test_a_job_scancelled_mid_cell_ends_the_cell_with_slurms_reason(gateway, make_shell, slurm, tmp_path):
    ip = make_shell(gateway())
    marker = tmp_path / "running"
    cancelled = {}

    def cancel_once_running() -> None:
        slurm.wait_for("the cell running", marker.exists, timeout=DEADLINE_S)
        cancelled["id"] = running_job(slurm)["id"]
        slurm.scancel(cancelled["id"])

    t = threading.Thread(target=cancel_once_running)
    t.start()
    result, cap = run(ip, f"%%gpu H100\nimport time\nopen({str(marker)!r}, 'w').close()\ntime.sleep(120)")
    t.join(DEADLINE_S)
    assert not result.success
    error = str(result.error_in_exec)
    assert f"was cancelled in Slurm (scancel, by its owner or an admin) (job {cancelled['id']}" in error, error
    assert "while running the cell; variables defined on the worker are lost" in error
    result, cap = run(ip, "%%gpu H100\nprint('a new job')")
    assert result.success and cap.stdout == "a new job\n", result.error_in_exec


def test_a_restarted_daemon_adopts_its_running_job(gateway, make_shell, slurm):
    d = gateway()
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nimport os\na = 41\nprint(os.environ['SLURM_JOB_ID'])")
    assert result.success
    job_id = cap.stdout.strip()
    d.kill()
    d2 = gateway()
    d2.log.wait_for(r"adopted the running worker of session", timeout=DEADLINE_S)
    result, cap = run(ip, "%%gpu H100\nprint(a + 1, os.environ['SLURM_JOB_ID'])")
    assert result.success, cap.stderr
    assert cap.stdout == f"42 {job_id}\n"
    assert [j["id"] for j in our_jobs(slurm)] == [job_id]


def test_slurms_time_limit_warns_the_cell_then_ends_it(gateway, make_shell, slurm):
    """Slurm's limits are whole minutes, checked every 30 s: this test takes 60 to 100 s."""
    ip = make_shell(gateway("--SlurmBackend.time_limit=1", "--SlurmBackend.time_warning_s=50"))
    result, cap = run(ip, "%%gpu cpu\nimport time\nprint('start', flush=True)\nwhile True:\n    time.sleep(1)")
    assert not result.success
    assert cap.stdout.startswith("start\n")
    assert "this session's Slurm job reaches its time limit in about 50 s" in cap.stderr, cap.stderr
    assert "its worker reached its Slurm time limit (job " in str(result.error_in_exec)
    assert not our_jobs(slurm)
    assert os.path.exists(str(slurm.conf))


def test_the_dial_back_address_admits_each_worker_as_itself_only(gateway, make_shell, slurm):
    """Hostile peers of the workers' tcp address: a key the daemon never made is refused at
    the handshake; a cell that reads its own worker's key (from /proc/self/environ) and
    claims another session's worker id reaches nothing of that session (ZeroMQ keeps the
    connected worker's id; past that, a key admits its own worker id only), which goes on."""
    d = gateway()
    alice, bob = make_shell(d), make_shell(d)
    assert run(bob, "%%gpu cpu\nsecret = 'bob'")[0].success
    bob_id = bob.magics_manager.registry["GPUMagics"].session_id
    attack = f"""%%gpu cpu
import zmq
env = dict(kv.split('=', 1) for kv in open('/proc/self/environ').read().split('\\0') if '=' in kv)
ctx = zmq.Context()
def peer(secret, identity):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.identity = identity.encode()
    s.curve_serverkey = env['JUPYTER_GPU_CURVE_SERVER'].encode()
    s.curve_secretkey = secret
    s.curve_publickey = zmq.curve_public(secret)
    s.connect(env['JUPYTER_GPU_ENDPOINT'])
    return s
stranger = peer(zmq.curve_keypair()[1], 'stranger')
impostor = peer(env['JUPYTER_GPU_CURVE_SECRET'].encode(), {bob_id!r})
impostor.send_multipart([b'<IDS|MSG>', b'0', b'{{}}', b'{{}}', b'{{}}', b'{{}}'])
print('sent')
"""
    result, cap = run(alice, attack)
    assert result.success and cap.stdout == "sent\n", result.error_in_exec
    d.log.wait_for(r"refused a CURVE connection to jupyter-gpu-workers from .*: key \S+ is not authorised")
    result, cap = run(bob, "%%gpu cpu\nprint(secret)")
    assert result.success and cap.stdout == "bob\n"
    assert not [line for line in d.log.lines if bob_id in line and "dropped" in line]


def test_a_job_pending_when_its_daemon_is_killed_is_cancelled_by_the_next_one(gateway, make_shell, slurm):
    """A pending job has no session record yet: the restarted daemon cannot vouch for it
    and cancels it, so nothing is left queued for a notebook that was told its cell failed."""
    d = gateway("--WorkerDaemon.worker_start_timeout=600")
    ip = make_shell(d)
    assert ip.run_cell("%config GPUMagics.heartbeat_timeout = 5.0").success
    blocker = slurm.sbatch("--gres=gpu:h100:2", "--output=/dev/null", script="#!/bin/sh\nexec sleep 600\n")
    slurm.wait_state(blocker, "RUNNING")
    pending: dict = {}

    def kill_once_ours_pends() -> None:
        pending["job"] = slurm.wait_for(
            "our job pending", lambda: next((j for j in our_jobs(slurm) if j["state"] == "PENDING"), None)
        )
        d.kill()
        pending["d2"] = gateway()

    t = threading.Thread(target=kill_once_ours_pends)
    t.start()
    result, cap = run(ip, "%%gpu H100\nprint('never')")
    t.join(DEADLINE_S)
    assert not result.success and "never" not in cap.stdout
    assert "restarted and will not answer this execute" in str(result.error_in_exec), result.error_in_exec
    pending["d2"].log.wait_for(r"removing leftover worker of session", timeout=DEADLINE_S)
    slurm.wait_gone(pending["job"]["id"])
    assert not our_jobs(slurm)


def test_an_interrupt_while_pending_in_slurm_cancels_the_job(gateway, slurm):
    d = gateway()
    blocker = slurm.sbatch("--gres=gpu:h100:2", "--output=/dev/null", script="#!/bin/sh\nexec sleep 600\n")
    slurm.wait_state(blocker, "RUNNING")
    with kernels.kernel(d.connection_file) as (km, kc):
        msg_id = kc.execute("%%gpu H100\nprint('never')", stop_on_error=False)
        job = slurm.wait_for(
            "our job pending", lambda: next((j for j in our_jobs(slurm) if j["state"] == "PENDING"), None)
        )
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=DEADLINE_S)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "error"
        assert "interrupted while waiting for a GPU or a worker; nothing ran" in reply["content"]["evalue"]
        slurm.wait_gone(job["id"])
        assert not our_jobs(slurm)


def test_the_notebooks_directory_reaches_a_node_without_a_shared_filesystem(gateway, make_shell, notebook_dir):
    """The synced workspace is mirrored over the worker's socket: data read, a module
    imported, only changed files sent, a cell's files counted and fetched back."""
    d = gateway()
    ip = make_shell(d)
    check_sync_round_trip(ip, notebook_dir, d, None)
    # it works in its copy, in the worker's own scratch directory on the node
    cap = run(ip, "%%gpu cpu\nimport os\nprint(os.getcwd())")[1]
    scratch, copy = os.path.split(cap.stdout.strip())
    assert copy == "workspace" and os.path.basename(scratch).startswith("jupyter-gpu-"), cap.stdout


def test_a_cell_forging_its_workspace_back_cannot_write_outside_it(gateway, make_shell, notebook_dir, tmp_path):
    """Code in a cell can send what its worker sends: a MIRROR ``back`` naming ``../``,
    an absolute path or a mismatched frame count is refused whole, and nothing is written
    outside the notebook's workspace."""
    d = gateway("--Workspaces.root={}".format(tmp_path / "workspaces"))
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\nx = 1")[0].success
    forge = """%%gpu cpu
import gc
from kernel_worker import protocol as P
from kernel_worker.executor.executor import Executor
ex = next(o for o in gc.get_objects() if isinstance(o, Executor))
cell = ex.stdin.request
for back, frames in (({'../../escape.txt': [3, 384]}, [b'bad']), ({'/tmp/abs.txt': [3, 384]}, [b'bad']),
                     ({'ok.txt': [3, 384]}, [])):
    with ex.channel.lock:
        ex.channel.send(cell.reply(P.Msg.MIRROR, {'back': back, 'gone': []}, frames))
print('sent')
"""
    result, cap = run(ip, forge)
    assert result.success and cap.stdout == "sent\n", result.error_in_exec
    d.log.wait_for("what its cell wrote in its workspace was refused", nth=3)
    assert len([line for line in d.log.lines if "what its cell wrote in its workspace was refused" in line]) == 3
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "workspaces" / "escape.txt").exists()
    assert not os.path.exists("/tmp/abs.txt")
    assert not list((tmp_path / "workspaces").glob("*/*/tree/ok.txt"))


def test_a_workspace_of_many_files_reaches_the_node_in_batches(gateway, make_shell, tmp_path, monkeypatch):
    nb = tmp_path / "many-nb"
    (nb / "many").mkdir(parents=True)
    for i in range(FILES + 1):
        (nb / "many" / f"f{i}").write_text(str(i))
    monkeypatch.chdir(nb)
    d = gateway()
    ip = make_shell(d)
    cell = "%%gpu cpu\nimport os\nnames = os.listdir('many')\nprint(len(names), open('many/f1000').read())"
    result, cap = run(ip, cell)
    assert result.success, result.error_in_exec
    assert cap.stdout == f"{FILES + 1} 1000\n"
    result, cap = run(ip, "%%gpu cpu\nfor i in range(1200):\n    open(f'many/g{i}', 'w').write('x')")
    assert result.success
    said = " ".join(notes(cap))
    assert f"{FILES} files created or changed in the workspace" in said, said  # the first batch, at once
    result, cap = run(ip, "%%gpu cpu\npass")
    assert "200 files created or changed in the workspace" in " ".join(notes(cap))  # the rest, with the next cell


def test_the_mirror_survives_a_daemon_restart(gateway, make_shell, notebook_dir):
    d = gateway()
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu cpu\nimport os\nprint(open('data/x.csv').read().splitlines()[1], os.getpid())")
    assert result.success, result.error_in_exec
    row, pid = cap.stdout.split()
    d.kill()
    d2 = gateway()
    d2.log.wait_for(r"adopted the running worker of session", timeout=DEADLINE_S)
    (notebook_dir / "data" / "x.csv").write_text("a,b\n7,8\n")
    cell = (
        "%%gpu cpu\nprint(open('data/x.csv').read().splitlines()[1], os.getpid())\n_ = open('made.txt', 'w').write('m')"
    )
    result, cap = run(ip, cell)
    assert result.success, result.error_in_exec
    assert (row, cap.stdout) == ("1,2", f"7,8 {pid}\n")  # the same worker, the changed file
    result, cap = run(ip, "%gpu fetch made.txt")
    assert result.success and (notebook_dir / "made.txt").read_text() == "m"


def test_a_worker_sigkilled_inside_its_job_ends_the_cell_and_the_job(gateway, make_shell, slurm, tmp_path):
    ip = make_shell(gateway())
    marker = tmp_path / "pid"
    killed = {}

    def kill_once_running() -> None:
        slurm.wait_for("the cell running", lambda: marker.exists() and marker.read_text(), timeout=DEADLINE_S)
        killed["job"] = running_job(slurm)["id"]
        os.kill(int(marker.read_text()), signal.SIGKILL)

    t = threading.Thread(target=kill_once_running)
    t.start()
    cell = f"%%gpu cpu\nimport os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)"
    result, _ = run(ip, cell)
    t.join(DEADLINE_S)
    error = str(result.error_in_exec)
    assert f"its worker killed by SIGKILL (Slurm job {killed['job']}) while running the cell" in error, error
    slurm.wait_gone(killed["job"])
    result, cap = run(ip, "%%gpu cpu\nprint('a new job')")
    assert result.success and cap.stdout == "a new job\n"


def test_a_dead_kernels_session_is_released_and_its_job_cancelled(gateway, slurm):
    d = gateway("--WorkerDaemon.client_timeout=2", "--WorkerDaemon.orphan_grace=1", "--WorkerDaemon.reap_interval=0.2")
    with kernels.kernel(d.connection_file, "%config GPUMagics.keepalive_interval = 0.5") as (km, kc):
        out, status = kernels.run(kc, "%%gpu H100\nimport os\nprint(os.environ['SLURM_JOB_ID'])")
        assert status == "ok", out
        kernels.kill(km)
        d.log.wait_for(r"released: its notebook's kernel went away", timeout=DEADLINE_S)
        slurm.wait_gone(out.strip())
    assert not our_jobs(slurm)
