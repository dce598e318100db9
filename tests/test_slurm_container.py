"""The executor in a container that Slurm itself starts (#15): the operator's
``SlurmBackend.sbatch_args=['--container=BUNDLE']`` and ``SlurmBackend.python`` (the
container's Python), with the node's ``oci.conf`` naming the runtime (runc), on the
one-node cluster of tests/support/slurm.py. No product code knows about containers:
Slurm's slurmstepd runs the batch script (which execs the executor) inside the bundle
(tests/support/slurm_oci.py), and the executor dials back over CURVE tcp to 127.0.0.1
through the host network the bundle shares.

Checked: a ``%%gpu H100`` cell runs in the container (a marker file only the bundle has,
the bundle's Python at its path and version, PID 1 of its own PID namespace, runc listing
the job's container), with Slurm's allocation and what Slurm 22.05 leaves out of a
container's environment; output streams back while the cell runs; functions, closures
and 8 MiB values go there and back; an interrupt reaches the cell through
``scancel --batch`` and runc, and the session stays; idle release cancels the job and
leaves no container behind. After every test ``runc list`` shows no container and
``squeue`` none of the daemon's jobs."""

from __future__ import annotations

import hashlib
import io
import secrets
import sys
import threading

import pytest
from IPython.utils.capture import capture_output
from support.shells import run
from support.slurm import slurm_cluster
from support.slurm_gateway import our_jobs
from support.slurm_oci import MARKER, PYTHON, SHARE, container_id, containers, make_bundle, oci_conf

DEADLINE_S = 60


@pytest.fixture(scope="module")
def runc_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runc")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("oci")
    return make_bundle(d / "bundle", share=d / "share")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, runc_root):
    """This module's cluster (in place of support.slurm_gateway's): its node runs
    ``--container`` jobs with runc, as the oci.conf beside its slurm.conf says."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm-oci"), conf_files={"oci.conf": oci_conf(runc_root)}) as cluster:
        yield cluster
    assert containers(runc_root) == []


@pytest.fixture(autouse=True)
def no_container_left(runc_root, slurm):
    """After each test (and after its gateway stopped): runc knows no container."""
    yield
    slurm.wait_for("runc listing no container", lambda: containers(runc_root) == [], DEADLINE_S)


def container_gateway(gateway, bundle, *options: str):
    """A daemon whose sessions' jobs run in ``bundle`` with the bundle's Python."""
    return gateway(
        f"--SlurmBackend.sbatch_args={[f'--container={bundle.path}']!r}",
        f"--SlurmBackend.python={PYTHON}",
        *options,
    )


def running_container(runc_root, slurm, job_id: str) -> dict:
    """runc's entry for the job's batch step: running, from the bundle Slurm made of ours
    in its spool directory."""
    [c] = containers(runc_root)
    assert (c["id"], c["status"]) == (container_id(slurm.node, "root", job_id), "running")
    assert c["bundle"] == f"{slurm.dir}/spool/oci-job{int(job_id):05d}-batch"
    return c


def release(ip, slurm, runc_root, job_id: str) -> dict:
    """``%gpu release``, then until Slurm has ended the job and runc lists no container
    (the executor, its container's first process, ignores Slurm's SIGTERM today: see
    test_a_released_executor_ends_on_slurms_sigterm_not_its_sigkill); the job's fields."""
    result, cap = run(ip, "%gpu release")
    assert result.success, (result.error_in_exec, cap.stderr)
    slurm.wait_gone(job_id, timeout=DEADLINE_S)
    slurm.wait_for("runc listing no container", lambda: containers(runc_root) == [], DEADLINE_S)
    return slurm.job(job_id)


class Watched(io.StringIO):
    """A notebook's stdout that says when a given line has arrived."""

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line
        self.arrived = threading.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.line in self.getvalue().splitlines():
            self.arrived.set()
        return n


def test_a_cell_runs_inside_the_container_slurm_started(gateway, make_shell, slurm, bundle, runc_root):
    ip = make_shell(container_gateway(gateway, bundle))
    assert run(ip, "a = 41\ndef f(x):\n    return x + 1")[0].success
    cell = (
        "%%gpu H100\nimport os, sys, platform\n"
        f"print(open({MARKER!r}).read().strip(), flush=True)\n"
        "print(sys.executable, platform.python_version(), os.getpid(), os.path.exists('/usr/sbin/slurmd'))\n"
        "env = os.environ\n"
        "print(env['SLURM_JOB_ID'], env['SLURM_CONTAINER'], env['JUPYTER_GPU_DEVICES'].split(':')[0], f(a))\n"
        "print(env.get('CUDA_VISIBLE_DEVICES'), env.get('SLURM_JOB_GPUS'))"
    )
    result, cap = run(ip, cell)
    assert result.success, (result.error_in_exec, cap.stderr)
    marker, python, job, gpus = cap.stdout.splitlines()
    assert marker == bundle.marker  # the bundle's root file system, which nothing else has
    # the bundle's Python (not the daemon's), the first process of the container's PID
    # namespace (the batch script exec'd it), on a root without the host's Slurm
    assert python.split() == [PYTHON, bundle.python_version, "1", "False"]
    assert (PYTHON, bundle.python_version) != (sys.executable, "{}.{}.{}".format(*sys.version_info[:3]))
    job_id, container, model, answer = job.split()
    assert (container, model, answer) == (str(bundle.path), "H100", "42")
    (queued,) = our_jobs(slurm)
    assert (queued["id"], queued["state"], queued["gres"]) == (job_id, "RUNNING", "gres:gpu:h100:1")
    assert slurm.job(job_id)["Container"] == str(bundle.path)
    running_container(runc_root, slurm, job_id)
    # Slurm 22.05 writes the container's config.json (environment included) when it sets
    # the step up, before it adds the allocation's GPU variables at the task's launch: a
    # --container job does not see them (later Slurm writes it at the launch).
    assert gpus == "None None"

    # Output arrives while the cell runs: the cell goes on only once the notebook has its
    # first line (the test then makes a file the container sees in its shared directory).
    go = f"go-{secrets.token_hex(4)}"
    watched = Watched("waiting for the notebook")

    def answer_once_seen() -> None:
        if watched.arrived.wait(DEADLINE_S):
            (bundle.share / go).touch()

    t = threading.Thread(target=answer_once_seen, daemon=True)
    t.start()
    with capture_output() as cap:
        inner, sys.stdout = sys.stdout, watched
        try:
            result = ip.run_cell(
                "%%gpu H100\nimport os, time\nprint('waiting for the notebook', flush=True)\n"
                f"seen, deadline = os.path.join({SHARE!r}, {go!r}), time.monotonic() + {DEADLINE_S}\n"
                "while not os.path.exists(seen) and time.monotonic() < deadline:\n    time.sleep(0.05)\n"
                "print('went on' if os.path.exists(seen) else 'the notebook never saw the line')",
                store_history=True,
            )
        finally:
            sys.stdout = inner
    t.join(DEADLINE_S)
    assert result.success, (result.error_in_exec, cap.stderr)
    assert watched.getvalue() == "waiting for the notebook\nwent on\n"

    # 8 MiB there (push) and back (pull), over the socket: no shared bulk directory
    big = bytes(range(256)) * 32768
    ip.user_ns["big"] = big
    result, cap = run(ip, "%gpu push big")
    assert result.success, cap.stderr
    result, cap = run(ip, "%%gpu H100 --pull back\nimport hashlib\nback = (hashlib.sha256(big).hexdigest(), big[::-1])")
    assert result.success, (result.error_in_exec, cap.stderr)
    assert ip.user_ns["back"] == (hashlib.sha256(big).hexdigest(), big[::-1])

    release(ip, slurm, runc_root, job_id)


def test_an_interrupt_reaches_the_cell_in_the_container_and_the_session_stays(
    gateway, make_shell, slurm, bundle, runc_root
):
    ip = make_shell(container_gateway(gateway, bundle))
    result, cap = run(ip, "%%gpu H100\nimport os\nkept = os.environ['SLURM_JOB_ID']\nprint(kept)")
    assert result.success, (result.error_in_exec, cap.stderr)
    job_id = cap.stdout.strip()
    pid = running_container(runc_root, slurm, job_id)["pid"]
    # --timeout interrupts as the stop button does: scancel --batch --signal=INT, to runc
    # (the batch step's task), which passes it on to the executor
    result, cap = run(ip, "%%gpu H100 --timeout 1\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    assert type(result.error_in_exec).__name__ == "KeyboardInterrupt"
    assert "passed --timeout 1 s" in cap.stderr
    # the executor's traceback (the image has no IPython): the cell stopped in its sleep, and
    # only the cell's frames show (not the runner's, nor the executor's signal handler's)
    tb = 'Traceback (most recent call last):\n  File "<cell>", line 3, in <module>\nKeyboardInterrupt\n'
    assert cap.stdout == "sleeping\n" + tb, cap.stdout
    result, cap = run(ip, "%%gpu H100\nimport os\nprint(kept == os.environ['SLURM_JOB_ID'], os.getpid())")
    assert result.success and cap.stdout == "True 1\n", (result.error_in_exec, cap.stderr)
    assert running_container(runc_root, slurm, job_id)["pid"] == pid  # the same container, still running
    release(ip, slurm, runc_root, job_id)


def test_idle_release_cancels_the_job_and_leaves_no_container(gateway, make_shell, slurm, bundle, runc_root):
    d = container_gateway(
        gateway, bundle, "--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2", "--Snapshots.on_idle_release=False"
    )
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu H100\nimport os\nprint(os.environ['SLURM_JOB_ID'])")
    assert result.success, (result.error_in_exec, cap.stderr)
    job_id = cap.stdout.strip()
    pid = running_container(runc_root, slurm, job_id)["pid"]
    d.log.wait_for(r"released: it was idle for more than 1 s", timeout=DEADLINE_S)
    slurm.wait_gone(job_id)
    assert slurm.job(job_id).get("JobState") in (None, "CANCELLED")
    slurm.wait_for("runc listing no container", lambda: containers(runc_root) == [], DEADLINE_S)
    slurm.wait_for(f"the container's first process ({pid}) gone", lambda: not _alive(pid), DEADLINE_S)


def _alive(pid: int) -> bool:
    """``pid`` is a live process (a zombie has no memory map left to read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_released_executor_ends_on_slurms_sigterm_not_its_sigkill(gateway, make_shell, slurm, bundle, runc_root):
    """scancel sends SIGTERM to the batch step (runc, which passes it on to the executor),
    then SIGKILL KillWait seconds later (5 s here) to whatever is left: the job's exit code
    says which ended it (``0:9``: Slurm's SIGKILL)."""
    ip = make_shell(container_gateway(gateway, bundle))
    result, cap = run(ip, "%%gpu H100\nimport os\nprint(os.environ['SLURM_JOB_ID'])")
    assert result.success, (result.error_in_exec, cap.stderr)
    job = release(ip, slurm, runc_root, cap.stdout.strip())
    assert job["JobState"] == "CANCELLED" and job["ExitCode"] != "0:9", job["ExitCode"]
