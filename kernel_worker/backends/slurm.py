"""A session's worker as a Slurm job: the daemon is a gateway on the cluster's login node,
Slurm's scheduler places each executor on a compute node with the GPUs it allocated, and
the executor dials back to the daemon over CURVE tcp with a key pair of its session's.

Nothing is scheduled here: the daemon's inventory is what Slurm declares (``sinfo``), a
request no node could ever serve is refused at once, and a session waits in Slurm's own
queue, with its place and Slurm's reason told to the notebook. A job Slurm ends (time
limit, preemption, node failure, ``scancel``) ends the session with Slurm's words. Jobs
carry the daemon and session in their name, so a restarted daemon finds its running jobs
again (``squeue``), and every release cancels its job.

Slurm's command line (``slurm_cli``), not pyslurm: see that module for why.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from traitlets import Bool, Dict, Float, Int, List, Unicode

from kernel_worker import protocol as P
from kernel_worker.backends.base import GPU_DEVICES_ENV, Backend, WorkerExit, WorkerSpec, describe_exit
from kernel_worker.backends.slurm_cli import Job, SlurmCLI, SlurmError, gres_argv, gres_totals
from kernel_worker.daemon.placement import ordinal
from kernel_worker.inventory import GPU

JOB_PREFIX = "jgpu-"  # then the daemon's id, '-', the worker id
TIME_WARNING = "USR1"  # the signal Slurm sends the executor ahead of the time limit
KEEP_ENV = ["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "SLURM_CONF"]
ENDED_WORDS = {
    "TIMEOUT": "reached its Slurm time limit",
    "CANCELLED": "was cancelled in Slurm (scancel, by its owner or an admin)",
    "PREEMPTED": "was preempted by Slurm for a job of higher priority",
    "NODE_FAIL": "lost its compute node (NODE_FAIL)",
    "BOOT_FAIL": "could not boot its node (BOOT_FAIL)",
    "OUT_OF_MEMORY": "ran out of the memory Slurm gave it (OUT_OF_MEMORY)",
    "DEADLINE": "passed its Slurm deadline",
}


@dataclass
class SlurmHandle:
    job_id: str
    wid: str
    state: str = "PENDING"
    reason: str = ""
    last: Job | None = None  # what Slurm said last


class SlurmBackend(Backend):
    name = "slurm"
    dials_back = True
    schedules = True

    partition = Unicode("", help="Slurm partition every session's job is submitted to ('': Slurm's default).").tag(
        config=True
    )
    account = Unicode("", help="Slurm account the jobs are charged to ('': the submitting user's default).").tag(
        config=True
    )
    qos = Unicode("", help="Slurm quality of service of the jobs ('': the default).").tag(config=True)
    time_limit = Unicode(
        "", help="A session's longest life as Slurm's --time (e.g. 8:00:00; '': the partition's limit)."
    ).tag(config=True)
    time_warning_s = Int(
        120,
        help="Seconds before the time limit that a running cell is warned in its output (Slurm's --signal; "
        "Slurm sends it up to a minute late). 0: no warning.",
    ).tag(config=True)
    gres_types = Dict(
        value_trait=Unicode(),
        help="GPU model as notebooks name it -> Slurm's gres type (e.g. {'H100': 'h100', 'A100-80GB': 'a100'}). "
        "A gres type not listed is offered under its own name in upper case.",
    ).tag(config=True)
    gpu_option = Unicode("gres", help="How GPUs are asked for: gres (--gres=gpu:TYPE:N) or gpus (--gpus=TYPE:N).").tag(
        config=True
    )
    sbatch_args = List(
        Unicode(), help="More sbatch options for every job (e.g. ['--mem=32G', '--cpus-per-gpu=8'])."
    ).tag(config=True)
    python = Unicode(sys.executable, help="The cluster's Python on the compute nodes, with pyzmq and cloudpickle.").tag(
        config=True
    )
    code_dir = Unicode(
        "",
        help="Where compute nodes find this package (put first on PYTHONPATH; '': this daemon's copy, which must "
        "then be on a filesystem the nodes share).",
    ).tag(config=True)
    dial_host = Unicode(
        "127.0.0.1",
        help="Address of this login node that compute nodes reach: workers dial tcp://HOST:PORT back (CURVE).",
    ).tag(config=True)
    dial_port = Int(0, help="Port workers dial back to (0: a free one, kept across daemon restarts).").tag(config=True)
    shared_filesystem = Bool(
        False,
        help="The compute nodes see this host's bulk root, workspaces and package directories at the same paths: "
        "large values, the notebook's files, snapshots and %gpu pip install packages then go by file, not over "
        "the socket.",
    ).tag(config=True)
    env_keep = List(Unicode(), KEEP_ENV, help="The daemon's environment variables a job inherits.").tag(config=True)
    extra_env = Dict(value_trait=Unicode(), help="Environment for every job, on top of env_keep.").tag(config=True)
    poll_interval = Float(1.0, help="Seconds between looks at a job's state (Slurm sends no events).").tag(config=True)
    command_timeout = Float(30.0, help="Seconds one Slurm command may take (a hung slurmctld never hangs us).").tag(
        config=True
    )
    stop_timeout = Float(60.0, help="Seconds to wait for a cancelled job to end before giving up on it.").tag(
        config=True
    )
    orphan_timeout = Float(
        600.0, help="Seconds a job whose daemon went away waits for a restarted daemon to adopt it, then ends."
    ).tag(config=True)

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.cli = SlurmCLI(timeout=self.command_timeout)
        self._seen: dict[str, Job] = {}  # job id -> what the last squeue said of it
        self._seen_at = -1e9
        self._looking: asyncio.Task | None = None  # the squeue in flight, shared by every watcher

    async def _refresh(self) -> None:
        """One ``squeue`` of this daemon's jobs for every session that waits on its job, at
        most once per ``poll_interval``: a login node is shared, and so is slurmctld."""
        if time.monotonic() - self._seen_at < self.poll_interval:
            return
        if self._looking is None or self._looking.done():
            self._looking = asyncio.ensure_future(self.cli.jobs(self.prefix, self.owner, ended_too=True))
        jobs = await asyncio.shield(self._looking)
        self._seen, self._seen_at = {j.id: j for j in jobs}, time.monotonic()

    @property
    def owner(self) -> str:
        """Whose jobs are ours: this process's uid, as squeue takes it. Never $USER or
        $LOGNAME (what getpass reads first), which ``sudo -E`` or ``su -m`` leave naming
        the invoking user, whose jobs may carry our names."""
        return str(os.geteuid())

    @property
    def prefix(self) -> str:
        return f"{JOB_PREFIX}{self.daemon_id}-"

    @property
    def shares_files(self) -> bool:
        return self.shared_filesystem

    def worker_path(self, host_path: str, bulk_dir: str) -> str:
        return host_path if self.shared_filesystem else ""

    def workspace_cwd(self, host_path: str) -> str:
        return host_path if self.shared_filesystem else ""

    def dial_back_url(self) -> str:
        return f"tcp://{self.dial_host}:{self.dial_port or '*'}"

    # ------------------------------------------------------------------ what Slurm offers

    def model_of(self, gres_type: str) -> str:
        for model, kind in self.gres_types.items():
            if kind == gres_type:
                return model
        return gres_type.upper()

    def gres_of(self, model: str) -> str:
        return self.gres_types.get(model) or model.lower()

    def inventory(self) -> list[GPU]:
        """The partition's GPUs as Slurm declares them, each named ``slurm:TYPE:N``: which
        physical GPU a job gets is Slurm's to say. Read once, at the daemon's start."""
        argv = gres_argv(self.partition)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=self.command_timeout, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or e
            raise RuntimeError(f"cannot ask Slurm for its GPUs ({' '.join(argv)}): {detail}") from None
        total = gres_totals(out.stdout)
        return [
            GPU(i, self.model_of(kind), f"Slurm gres gpu:{kind}", f"slurm:{kind}:{i}", 0, elsewhere=True)
            for kind, n in sorted(total.items())
            for i in range(n)
        ]

    def gpu_env(self, gpus: list[GPU]) -> dict[str, str]:
        """Slurm sets CUDA_VISIBLE_DEVICES for what it allocated; only the models are told."""
        return {GPU_DEVICES_ENV: ",".join(f"{g.model}:{g.uuid}" for g in gpus) or "cpu"}

    # ------------------------------------------------------------------ a job's life

    def _options(self, spec: WorkerSpec) -> list[str]:
        counts: dict[str, int] = {}
        for g in spec.gpus:
            counts[g.model] = counts.get(g.model, 0) + 1
        opts = [
            f"--job-name={self.prefix}{spec.session}",
            f"--comment=jupyter-gpu session {spec.session} of {spec.user or '-'}",
            f"--output={spec.log_path}",
            "--export=NONE",  # the script says exactly what the job's environment is
            "--no-requeue",  # a requeued job would come back as a stranger with a fresh namespace
        ]
        for model, n in counts.items():
            kind = self.gres_of(model)
            opts.append(f"--gres=gpu:{kind}:{n}" if self.gpu_option == "gres" else f"--gpus={kind}:{n}")
        for flag, value in (("partition", self.partition), ("account", self.account), ("qos", self.qos)):
            if value:
                opts.append(f"--{flag}={value}")
        if self.time_limit:
            opts.append(f"--time={self.time_limit}")
            if self.time_warning_s > 0:
                opts.append(f"--signal=B:{TIME_WARNING}@{self.time_warning_s}")
        return opts + list(self.sbatch_args)

    def _script(self, spec: WorkerSpec) -> str:
        env = {
            **{k: v for k, v in os.environ.items() if k in self.env_keep},
            **self.extra_env,
            **self.gpu_env(spec.gpus),
            **spec.env,
            "PYTHONUNBUFFERED": "1",
            P.Env.TIME_WARNING: f"{self.time_warning_s}" if self.time_limit and self.time_warning_s > 0 else "",
            P.Env.BULK_DIR: spec.bulk_dir if self.shared_filesystem else "",
        }
        root = self.code_dir or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        packages = self.packages_for(spec.user) if self.packages_for is not None and self.shared_filesystem else ""
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, packages, env.get("PYTHONPATH", "")]))
        lines = ["#!/bin/sh", "# jupyter-gpu executor: the job's whole environment is set here (--export=NONE)"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k.isidentifier()]
        lines.append(f"exec {shlex.quote(self.python)} -m kernel_worker.worker")
        return "\n".join(lines) + "\n"

    async def start(self, spec: WorkerSpec) -> SlurmHandle:
        self.refuse_options(spec, "images and volumes are the docker backend's")
        try:
            job_id = await self.cli.submit(self._script(spec), self._options(spec))
        except SlurmError as e:
            if e.never:
                gres = await self.cli.gres(self.partition)
                have = ", ".join(f"{self.model_of(k)}:{n}" for k, n in gres.items()) or "no GPUs"
                raise RuntimeError(f"Slurm can never run this request: {e.text} (partition has: {have})") from None
            raise RuntimeError(f"Slurm refused the job: {e}") from None
        self.log.info("session %s: Slurm job %s submitted", spec.session, job_id)
        return SlurmHandle(job_id, spec.session)

    async def _look(self, handle: SlurmHandle) -> Job | None:
        await self._refresh()
        job = self._seen.get(handle.job_id)
        if job is None or job.ended:  # its last words (exit code, reason), or gone from squeue
            job = await self.cli.job(handle.job_id)
        if job is not None:
            handle.state, handle.reason, handle.last = job.state, job.reason, job
        else:
            handle.state = "GONE"
        return job

    async def placed(self, handle: SlurmHandle, on_wait: Callable[[str], None]) -> None:
        told = ""
        while True:
            job = await self._look(handle)
            if job is None or job.ended:
                raise RuntimeError(f"Slurm job {handle.job_id} ended before it ran: {self.ended_words(handle)}")
            if job.state != "PENDING":
                return
            place = await self.cli.position(handle.job_id, self.partition) if self.partition else None
            text = f"pending in Slurm: {job.reason}" + (
                f", {ordinal(place[0])} of {place[1]} in partition {self.partition}" if place else ""
            )
            if text != told:
                on_wait(text)
                told = text
            await asyncio.sleep(self.poll_interval)  # Slurm has no events to wait on: a poll

    def ended_words(self, handle: SlurmHandle) -> str:
        if handle.state == "GONE":
            return f"Slurm job {handle.job_id} is gone from Slurm's records"
        words = ENDED_WORDS.get(handle.state.split()[0], f"ended in Slurm as {handle.state}")
        reason = handle.reason if handle.reason not in ("", "None") else ""
        return f"{words} (job {handle.job_id}{', ' + reason if reason else ''})"

    async def signal(self, handle: SlurmHandle, signum: int) -> None:
        name = signal.Signals(signum).name.removeprefix("SIG")
        try:  # the batch step is the executor itself (the script execs it)
            await self.cli.run("scancel", "--batch", f"--signal={name}", handle.job_id)
        except SlurmError as e:
            self.log.warning("could not signal Slurm job %s: %s", handle.job_id, e)

    async def stop(self, handle: SlurmHandle) -> None:
        try:
            await self.cli.cancel(handle.job_id)
        except SlurmError as e:  # slurmctld away: the release goes on; the job's owner can scancel it
            self.log.error("could not cancel Slurm job %s (scancel %s by hand): %s", handle.job_id, handle.job_id, e)
            return
        try:
            await asyncio.wait_for(self._ended(handle), self.stop_timeout)
        except (asyncio.TimeoutError, SlurmError) as e:
            self.log.warning("Slurm job %s did not end within %g s of scancel: %s", handle.job_id, self.stop_timeout, e)

    async def _ended(self, handle: SlurmHandle) -> None:
        while True:
            job = await self._look(handle)
            if job is None or job.ended:
                return
            await asyncio.sleep(self.poll_interval)  # a poll, as above

    async def wait(self, handle: SlurmHandle) -> WorkerExit:
        while True:
            try:
                await self._ended(handle)
                break
            except SlurmError as e:  # slurmctld away for a while: its jobs go on, so do we
                self.log.warning("cannot see Slurm job %s now: %s", handle.job_id, e)
                await asyncio.sleep(self.poll_interval)
        code = None
        if handle.last is not None and ":" in handle.last.exit_code:
            status, _, sig = handle.last.exit_code.partition(":")
            code = -int(sig) if sig.isdigit() and int(sig) else int(status) if status.isdigit() else None
        if handle.state == "COMPLETED" or (handle.state == "FAILED" and code not in (None, 0)):
            return WorkerExit(code, f"{describe_exit(code)} (Slurm job {handle.job_id})")
        return WorkerExit(code, self.ended_words(handle))

    # ------------------------------------------------------------------ restart

    async def find(self) -> list[tuple[str, Any]]:
        found = []
        for job in await self.cli.jobs(self.prefix, user=self.owner):
            wid = job.name[len(self.prefix) :]
            if P.SESSION_RE.match(wid) and wid:
                found.append((wid, SlurmHandle(job.id, wid, job.state, job.reason, job)))
        return found

    def is_running(self, handle: SlurmHandle) -> bool:
        return handle.state == "RUNNING"
