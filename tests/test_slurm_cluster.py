"""The real one-node Slurm of tests/support/slurm.py, used the way the Slurm backend (#15)
will use it: sbatch with GPU gres and parsable output, squeue with its own format, the
queue reason and position, scancel, a request the partition can never satisfy, time limits
with a warning signal, and what scontrol and sacct (no slurmdbd) say about ended jobs.
Every wait polls Slurm with a deadline; what each test asserts is what Slurm 22.05 (Debian
bookworm's slurm-wlm) was seen to do."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.slurm import SlurmCluster, processes_with_conf, slurm_cluster

NEVER_SATISFIABLE = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One cluster for the module; every test leaves its queue empty (see ``empty_queue``)."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm-cluster")) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def empty_queue(request):
    """Cancels whatever a test of this module left queued, and waits until squeue is empty."""
    yield
    if "slurm" in request.fixturenames:
        cluster: SlurmCluster = request.getfixturevalue("slurm")
        ids = [j["id"] for j in cluster.queue()]
        if ids:
            cluster.scancel(*ids)
            cluster.wait_for("an empty queue", lambda: not cluster.queue())


def _live(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _env_file(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _pending_positions(slurm: SlurmCluster) -> list[tuple[str, str]]:
    """(job id, reason) of the partition's pending jobs in the order the scheduler takes
    them: priority first, then job id."""
    r = slurm.squeue("-h", "-t", "PENDING", "-p", slurm.partition, "--sort=-p,i", "-o", "%i|%r")
    return [tuple(line.split("|", 1)) for line in r.stdout.splitlines()]


def test_cluster_is_up_with_declared_gpus(slurm):
    assert slurm.started_s < 10, f"the cluster took {slurm.started_s:.2f} s to start"
    assert set(slurm.alive()) == {"munged", "slurmctld", "slurmd"}
    r = slurm.sinfo("-h", "-N", "-o", "%N|%P|%T|%G")
    assert r.stdout.split() == ["localhost|gpu*|idle|gpu:h100:2,gpu:a100:1"]
    node = slurm.scontrol("show", "node", "-o", "localhost").stdout
    assert "Gres=gpu:h100:2,gpu:a100:1 " in node and "NodeAddr=127.0.0.1 " in node
    assert slurm.run("sbatch", "--version").stdout.startswith("slurm-wlm 22.05.")


def test_gpu_job_sees_its_gpus_and_scancel_ends_it(slurm):
    d = slurm.dir
    batch_env, step_env, pidfile = d / "t1.batch.env", d / "t1.step.env", d / "t1.pid"
    GPU_VARS = "CUDA_VISIBLE_DEVICES|SLURM_JOB_GPUS|SLURM_STEP_GPUS|SLURM_GPUS_ON_NODE|GPU_DEVICE_ORDINAL"
    script = f"""#!/bin/sh
env | grep -E '^({GPU_VARS})=' > {batch_env}
srun env | grep -E '^(CUDA_VISIBLE_DEVICES|SLURM_JOB_GPUS|SLURM_STEP_GPUS)=' > {step_env}.tmp
mv {step_env}.tmp {step_env}
echo $$ > {pidfile}
exec sleep 600
"""
    t0 = time.monotonic()
    job = slurm.sbatch("--gres=gpu:h100:1", "--job-name=jgpu-s1", "--comment=jupyter-gpu:session=s1", script=script)
    assert job.isdigit()
    fields = slurm.wait_state(job, "RUNNING")
    started = time.monotonic() - t0
    assert fields["TresPerNode"] == "gres:gpu:h100:1"
    assert fields["NodeList"] == "localhost" and fields["Partition"] == "gpu"
    assert started < 10, f"sbatch to RUNNING took {started:.2f} s"

    slurm.wait_for("the job's pid", lambda: pidfile.exists() and pidfile.read_text().strip())
    pid = int(pidfile.read_text())
    assert _env_file(batch_env) == {
        "CUDA_VISIBLE_DEVICES": "0",
        "SLURM_JOB_GPUS": "0",
        "SLURM_GPUS_ON_NODE": "1",
        "GPU_DEVICE_ORDINAL": "0",
    }  # no SLURM_STEP_GPUS in the batch step
    assert _env_file(step_env) == {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "0", "SLURM_STEP_GPUS": "0"}

    # the allocated GPU indices, and what the backend reads back to re-adopt a job
    detail = slurm.scontrol("-d", "show", "job", job).stdout
    assert "GRES=gpu:h100:1(IDX:0)" in detail
    r = slurm.squeue("-h", "-j", job, "-o", "%i|%T|%j|%k|%b|%N|%P")
    assert r.stdout.strip() == f"{job}|RUNNING|jgpu-s1|jupyter-gpu:session=s1|gres:gpu:h100:1|localhost|gpu"

    slurm.scancel(job)
    slurm.wait_gone(job)
    assert slurm.squeue("-h", "-j", job, check=False).stdout == ""
    ended = slurm.job(job)
    assert (ended["JobState"], ended["Reason"], ended["ExitCode"]) == ("CANCELLED", "None", "0:15")
    slurm.wait_for("the job's process gone", lambda: not _live(pid))


def test_a100_job_sees_the_nodes_index(slurm):
    """The a100 is the node's third GPU (gres.conf order): its job sees index 2 in both
    SLURM_JOB_GPUS and CUDA_VISIBLE_DEVICES. Without device cgroups (task/none, no
    ConstrainDevices) Slurm does not renumber from 0, so CUDA_VISIBLE_DEVICES is the node's
    own index; under ConstrainDevices=yes it would read 0."""
    out = slurm.dir / "a100.env"
    job = slurm.sbatch(
        "--gres=gpu:a100:1",
        script=f"#!/bin/sh\nenv | grep -E '^(CUDA_VISIBLE_DEVICES|SLURM_JOB_GPUS)=' > {out}.tmp\nmv {out}.tmp {out}\n",
    )
    ended = slurm.wait_state(job, "COMPLETED", "FAILED")
    assert (ended["JobState"], ended["ExitCode"]) == ("COMPLETED", "0:0")
    assert _env_file(out) == {"CUDA_VISIBLE_DEVICES": "2", "SLURM_JOB_GPUS": "2"}


@pytest.mark.parametrize("request_opt", ["--gres=gpu:h100:3", "--gres=gpu:v100:1", "--gpus=h100:3"])
def test_request_the_partition_can_never_satisfy_is_refused_at_once(slurm, request_opt):
    t0 = time.monotonic()
    r = slurm.sbatch(request_opt, script="#!/bin/sh\ntrue\n", check=False)
    assert time.monotonic() - t0 < 5
    assert (r.returncode, r.stdout, r.stderr) == (1, "", NEVER_SATISFIABLE)
    assert slurm.queue() == []


def test_job_queues_behind_one_holding_both_h100s(slurm):
    sleeper = "#!/bin/sh\nexec sleep 600\n"
    first = slurm.sbatch("--gres=gpu:h100:2", script=sleeper)
    slurm.wait_state(first, "RUNNING")
    second = slurm.sbatch("--gres=gpu:h100:1", script=sleeper)
    third = slurm.sbatch("--gres=gpu:h100:1", script=sleeper)
    # "None" until the scheduler has looked at it, then Resources; the one behind it: Priority
    slurm.wait_for("second pending on Resources", lambda: slurm.job(second)["Reason"] == "Resources")
    assert _pending_positions(slurm) == [(second, "Resources"), (third, "Priority")]
    r = slurm.squeue("-h", "-j", second, "-o", "%T|%r|%b")
    assert r.stdout.strip() == "PENDING|Resources|gres:gpu:h100:1"

    slurm.scancel(first)
    slurm.wait_state(second, "RUNNING")
    slurm.wait_state(third, "RUNNING")
    assert _pending_positions(slurm) == []
    assert {j["id"]: j["state"] for j in slurm.queue()} == {second: "RUNNING", third: "RUNNING"}


def test_failed_job_in_scontrol_and_sacct_without_slurmdbd(slurm):
    """No slurmdbd: plain sacct refuses; ``sacct -c`` reads the jobcomp/filetxt file, which
    holds a job only once it has ended."""
    running = slurm.sbatch("--job-name=jgpu-run", script="#!/bin/sh\nexec sleep 600\n")
    slurm.wait_state(running, "RUNNING")
    failed = slurm.sbatch("--job-name=jgpu-fail", script="#!/bin/sh\nexit 3\n")
    ended = slurm.wait_state(failed, "FAILED", "COMPLETED")
    assert (ended["JobState"], ended["Reason"], ended["ExitCode"]) == ("FAILED", "NonZeroExitCode", "3:0")

    r = slurm.sacct(check=False)
    assert (r.returncode, r.stderr) == (1, "Slurm accounting storage is disabled\n")
    # the jobcomp line is written as the job ends: poll for it
    fmt = ["-c", "-P", "-n", "-o", "JobID,JobName,State,ExitCode,NodeList"]
    slurm.wait_for("the failed job in sacct -c", lambda: slurm.sacct(*fmt, "-j", failed).stdout.strip())
    assert slurm.sacct(*fmt, "-j", failed).stdout.strip() == f"{failed}|jgpu-fail|FAILED|3:0|localhost"
    assert slurm.sacct(*fmt, "-j", running).stdout == ""  # still running: not there yet

    slurm.scancel(running)
    slurm.wait_gone(running)
    slurm.wait_for("the cancelled job in sacct -c", lambda: slurm.sacct(*fmt, "-j", running).stdout.strip())
    # jobcomp records a cancelled job's exit code as 0:0, where scontrol says 0:15
    assert slurm.sacct(*fmt, "-j", running).stdout.strip() == f"{running}|jgpu-run|CANCELLED|0:0|localhost"
    assert slurm.job(running)["ExitCode"] == "0:15"


@pytest.mark.timeout(240)
def test_time_limit_is_whole_minutes_warns_then_kills(slurm):
    """``--time=0:05`` (five seconds) becomes a one-minute limit. slurmctld checks limits
    and ``--signal`` deadlines in a background pass every 30 s, so the job ends 60 to 90 s
    after it started, and the warning comes on the same 30 s grid."""
    log = slurm.dir / "timelimit.log"
    script = f"""#!/bin/bash
trap 'echo USR1 $(date +%s.%N) >> {log}' USR1
echo start $(date +%s.%N) >> {log}
while true; do sleep 1; done
"""
    job = slurm.sbatch("--time=0:05", "--signal=B:USR1@50", script=script)
    fields = slurm.wait_state(job, "RUNNING")
    assert fields["TimeLimit"] == "00:01:00"
    t0 = time.monotonic()
    ended = slurm.wait_state(job, "TIMEOUT", "CANCELLED", "FAILED", "COMPLETED", timeout=150)
    took = time.monotonic() - t0
    assert (ended["JobState"], ended["Reason"], ended["ExitCode"]) == ("TIMEOUT", "TimeLimit", "0:15")
    assert 55 <= took <= 100, took
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [w[0] for w in lines] == ["start", "USR1"]
    warned_after = float(lines[1][1]) - float(lines[0][1])
    assert warned_after < 60 - 25, f"USR1 {warned_after:.1f} s after the start, the limit at 60"
    fmt = ["-c", "-P", "-n", "-j", job, "-o", "JobID,State"]
    slurm.wait_for("the job in sacct -c", lambda: slurm.sacct(*fmt).stdout.strip())
    assert slurm.sacct(*fmt).stdout.strip() == f"{job}|TIMEOUT"


def test_everything_started_is_stopped_even_when_the_test_fails(tmp_path):
    """A job whose child escaped Slurm's process tracking (a double fork that ignores
    TERM), a test that raises: at exit the daemons are gone and so is the escaped process."""
    escaped = tmp_path / "escaped.pid"
    with pytest.raises(RuntimeError, match="the test failed"), slurm_cluster(tmp_path) as cluster:
        script = f"""#!/bin/sh
setsid sh -c 'trap "" TERM; echo $$ > {escaped}.tmp; mv {escaped}.tmp {escaped}; exec sleep 600' &
exec sleep 600
"""
        job = cluster.sbatch("--gres=gpu:h100:1", script=script)
        cluster.wait_state(job, "RUNNING")
        cluster.wait_for("the escaped pid", escaped.exists)
        daemons = cluster.alive()
        assert set(daemons) == {"munged", "slurmctld", "slurmd"}
        raise RuntimeError("the test failed")
    pid = int(escaped.read_text())
    assert pid in cluster.leftovers  # it outlived scancel: only the environment scan found it
    assert not _live(pid)
    assert [p for p in daemons.values() if _live(p)] == []
    assert processes_with_conf(cluster.conf) == []
