"""A real one-node Slurm cluster for the tests: Debian's munged, slurmctld and slurmd
(``make system-deps`` installs slurm-wlm and munge), each with its own key, socket, config,
state, spool and log files under the test's directory, on loopback ports picked free, so
two test runs at once never meet. The node declares GPUs it does not have
(``gpu:h100:2,gpu:a100:1``): gres.conf names character devices the fixture makes with
``mknod`` (count-only gres is refused by this Slurm, and plain files give no
``CUDA_VISIBLE_DEVICES``).

    with slurm_cluster(tmp_path) as slurm:
        job = slurm.sbatch("--gres=gpu:h100:1", script="#!/bin/sh\\nsleep 60\\n")
        slurm.wait_state(job, "RUNNING")

Every client call carries ``SLURM_CONF`` and a timeout (with the controller down, ``sinfo``
hangs). At exit, whatever happened: every job is cancelled and ``squeue`` waited empty, then
slurmd, slurmctld and munged are stopped by their pids, and any process still carrying this
cluster's ``SLURM_CONF`` (a ``slurmstepd`` or a job's child that outlived it) is killed by pid.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .procs import stop_process

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
NODE = "localhost"
PARTITION = "gpu"
# Declared GPUs: type -> count. The node's Gres= and gres.conf are made from this.
GPUS = {"h100": 2, "a100": 1}
NVIDIA_MAJOR = 195  # the nvidia driver's character-device major; nothing here opens them
CLIENT_TIMEOUT = 20.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tick() -> None:
    select.select([], [], [], 0.05)  # a retry interval between polls, not a synchronisation


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    env: dict
    node: str = NODE
    partition: str = PARTITION
    gpus: dict = field(default_factory=lambda: dict(GPUS))
    ctld_port: int = 0
    slurmd_port: int = 0
    procs: dict = field(default_factory=dict)  # name -> Popen, in start order
    started_s: float = 0.0  # munged start to node idle
    leftovers: list = field(default_factory=list)  # pids stop() had to kill after the daemons

    # -- clients --------------------------------------------------------------------------
    def run(self, *argv: str, timeout: float = CLIENT_TIMEOUT, check: bool = True, input: str | None = None):
        """One Slurm client command with this cluster's ``SLURM_CONF``, bounded by ``timeout``."""
        r = subprocess.run(
            list(argv),
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=self.dir,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def sbatch(self, *args: str, script: str, check: bool = True):
        """``sbatch --parsable`` with ``script`` on stdin; the job id (a string), or with
        ``check=False`` the CompletedProcess."""
        r = self.run("sbatch", "--parsable", f"--partition={self.partition}", *args, input=script, check=check)
        return r.stdout.strip().split(";")[0] if check else r

    def sbatch_as(self, user: str, *args: str, script: str) -> str:
        """``sbatch`` as another Unix ``user`` (``runuser``, from ``/``), with this cluster's
        ``SLURM_CONF``: their job id. The user must reach slurm.conf and munged's socket
        (a cluster under a directory only root can enter refuses them)."""
        argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", f"--partition={self.partition}", *args]
        r = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, input=script, cwd="/"
        )
        if r.returncode != 0:
            raise AssertionError(f"sbatch as {user} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout.strip().split(";")[0]

    def squeue(self, *args: str, **kw):
        return self.run("squeue", *args, **kw)

    def scancel(self, *args: str, **kw):
        return self.run("scancel", *args, **kw)

    def sacct(self, *args: str, **kw):
        return self.run("sacct", *args, **kw)

    def scontrol(self, *args: str, **kw):
        return self.run("scontrol", *args, **kw)

    def sinfo(self, *args: str, **kw):
        return self.run("sinfo", *args, **kw)

    # -- reading state ---------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        """``scontrol show job -o``, as a dict of its Key=Value fields; {} once the
        controller has forgotten the job (MinJobAge after it ended)."""
        r = self.scontrol("show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return {}
            raise AssertionError(f"scontrol show job {job_id}: {r.stderr.strip()}")
        return parse_scontrol(r.stdout)

    def queue(self) -> list[dict]:
        """The jobs ``squeue`` lists (pending, running, completing), oldest first."""
        r = self.squeue("-h", "--sort=i", "-o", "%i|%T|%r|%b|%Q|%P|%u|%j")
        keys = ("id", "state", "reason", "gres", "priority", "partition", "user", "name")
        return [dict(zip(keys, line.split("|", len(keys) - 1))) for line in r.stdout.splitlines()]

    def wait_for(self, what: str, probe, timeout: float = 30.0):
        """Polls ``probe()`` until it returns something truthy (returned), or fails after
        ``timeout`` seconds with the last value seen."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not after {timeout} s (last seen: {value!r})")
            _tick()

    def wait_state(self, job_id: str, *states: str, timeout: float = 30.0) -> dict:
        """Until ``scontrol show job`` gives the job one of ``states``; its fields then."""

        def probe():
            j = self.job(job_id)
            return j if j.get("JobState") in states else None

        return self.wait_for(f"job {job_id} in {states}", probe, timeout)

    def wait_gone(self, job_id: str, timeout: float = 30.0) -> None:
        """Until ``squeue`` no longer lists the job."""
        self.wait_for(
            f"job {job_id} gone from squeue", lambda: all(j["id"] != str(job_id) for j in self.queue()), timeout
        )

    def alive(self) -> dict:
        """Which of the daemons this cluster started still run: name -> pid."""
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    def log(self, name: str) -> str:
        p = self.dir / "log" / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # -- stopping ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job and wait until squeue is empty (a slurmstepd ignores TERM), then
        slurmd, slurmctld and munged by pid; then any process left with this SLURM_CONF."""
        try:
            ctld = self.procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                try:
                    ids = [j["id"] for j in self.queue()]
                    if ids:
                        self.scancel(*ids, check=False, timeout=10)
                        self.wait_for("every job ended", lambda: not self.queue(), STOP_TIMEOUT)
                except (AssertionError, subprocess.TimeoutExpired, ValueError):
                    pass  # the daemons are stopped below, and what the jobs left is killed by pid
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                p = self.procs.get(name)
                if p is not None:
                    stop_process(p, 10)
            self.leftovers = kill_leftovers(self.conf)


def parse_scontrol(text: str) -> dict:
    """``Key=Value Key=Value ...`` (one record, ``-o``). Values may hold spaces only for the
    few keys that end a record (Command, WorkDir, ...): a token without ``=`` joins the one
    before it."""
    out: dict = {}
    last = None
    for tok in text.split():
        k, eq, v = tok.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_:/]*", k):
            out[k] = v
            last = k
        elif last is not None:
            out[last] += " " + tok
    return out


def _ancestors() -> set[int]:
    """This process and its ancestors: never a leftover, whatever their environment says."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_with_conf(conf: Path) -> list[int]:
    """Pids of live processes whose environment names this cluster's config: slurmstepds
    and the jobs they ran (a job inherits the submitter's environment, so a process that
    escaped its job's process tracking, a double fork, carries it too). A zombie's environ
    reads empty, so the dead never match."""
    needle = f"SLURM_CONF={conf}".encode()
    skip = _ancestors()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry))
    return pids


def kill_leftovers(conf: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL to what is still there after ``grace`` seconds, to every
    process carrying this cluster's SLURM_CONF, each by its pid; the pids it found."""
    found = processes_with_conf(conf)
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while found and time.monotonic() < deadline and processes_with_conf(conf):
        _tick()
    killed = processes_with_conf(conf)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while killed and processes_with_conf(conf) and time.monotonic() < deadline:
        _tick()  # SIGKILL is delivered asynchronously: until they have exited
    return found


def write_config(d: Path, node: str = NODE, gpus: dict = GPUS, cpus: int = 8, extra: str = "") -> tuple[Path, int, int]:
    """slurm.conf, gres.conf and plugstack.conf for one node under ``d``; the path of
    slurm.conf, slurmctld's port and slurmd's port."""
    ctld_port, slurmd_port = _free_port(), _free_port()
    while slurmd_port == ctld_port:
        slurmd_port = _free_port()
    dev = d / "dev"
    dev.mkdir(exist_ok=True)
    gres_lines, n = [], 0
    for gtype, count in gpus.items():
        for _ in range(count):
            path = dev / f"nvidia{n}"
            if not path.exists():
                os.mknod(path, 0o600 | 0o020000, os.makedev(NVIDIA_MAJOR, n))  # S_IFCHR
            n += 1
        first = n - count
        files = f"{dev}/nvidia{first}" if count == 1 else f"{dev}/nvidia[{first}-{n - 1}]"
        gres_lines.append(f"NodeName={node} Name=gpu Type={gtype} File={files}")
    (d / "gres.conf").write_text("AutoDetect=off\n" + "\n".join(gres_lines) + "\n")
    (d / "plugstack.conf").write_text("")  # not the system's /etc/slurm/plugstack.conf.d
    gres = ",".join(f"gpu:{t}:{c}" for t, c in gpus.items())
    conf = d / "slurm.conf"
    conf.write_text(
        f"""\
ClusterName=jgpu{ctld_port}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={d}/plugstack.conf
TmpFS={d}/tmp
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
# the node is what this file says (CPUs, memory), whatever the machine has
SlurmdParameters=config_overrides
ReturnToService=2
# an ended job stays in scontrol for 300 s; time limits are whole minutes, enforced in a
# 30 s background pass; scancel/timeout: TERM, then KILL 5 s later
MinJobAge=300
OverTimeLimit=0
KillWait=5
InactiveLimit=0
# no slurmdbd: plain sacct is refused; `sacct -c` reads the jobcomp file (ended jobs only)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} CPUs={cpus} RealMemory=4000 Gres={gres} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=60 State=UP
{extra}"""
    )
    return conf, ctld_port, slurmd_port


def _start_munged(d: Path) -> subprocess.Popen:
    """munged in the foreground with a key of its own (0400, in a 0700 directory, owned by
    root, who runs it). munged also wants every directory above its socket searchable by
    all; pytest's tmp dirs are 0700, hence ``--force`` (which turns that check into a
    warning): every client here is root anyway."""
    m = d / "munge"  # the socket's directory: munged wants it searchable by all
    m.mkdir()
    m.chmod(0o755)
    keydir = d / "munge-key"
    keydir.mkdir(mode=0o700)
    key = keydir / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    try:
        os.write(fd, os.urandom(1024))
    finally:
        os.close(fd)
    proc = _daemon(
        [
            MUNGED,
            "--foreground",
            "--force",  # the test's directory is 0700: only root (every client here) reaches the socket
            f"--key-file={key}",
            f"--socket={m}/munge.socket",
            f"--pid-file={m}/munged.pid",
            f"--log-file={d}/log/munged.log",
            f"--seed-file={keydir}/munged.seed",
            "--origin=127.0.0.1",
            "--num-threads=2",
        ],
        dict(os.environ),
        d / "log" / "munged.stderr",
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not (m / "munge.socket").exists():
        if proc.poll() is not None:
            raise RuntimeError(f"munged exited {proc.returncode}: {(d / 'log' / 'munged.stderr').read_text()}")
        if time.monotonic() > deadline:
            stop_process(proc, 5)
            raise RuntimeError(f"munged made no socket in {START_TIMEOUT} s")
        _tick()
    return proc


def _daemon(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A daemon in the foreground, its stderr to ``log`` (the child keeps its own copy of the fd)."""
    with open(log, "wb") as err:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


class _PortTaken(RuntimeError):
    """A daemon found its port taken (by someone who bound it after we picked it)."""


def _start(d: Path, cpus: int, gpus: dict, extra_conf: str, conf_files: dict | None = None) -> SlurmCluster:
    """One attempt: config under ``d``, then munged, slurmctld and slurmd, until sinfo shows
    the node idle. Whatever it started is in the returned cluster's procs, also on failure
    (raised with the cluster as ``err.cluster``)."""
    d.mkdir()
    for sub in ("state", "spool", "run", "log", "tmp"):
        (d / sub).mkdir()
    conf, ctld_port, slurmd_port = write_config(d, gpus=gpus, cpus=cpus, extra=extra_conf)
    for name, text in (conf_files or {}).items():  # beside slurm.conf, where Slurm looks (oci.conf, ...)
        (d / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(dir=d, conf=conf, env=env, gpus=dict(gpus), ctld_port=ctld_port, slurmd_port=slurmd_port)
    t0 = time.monotonic()

    def idle():
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            logs = {n: (d / "log" / f"{n}.stderr").read_text(errors="replace") + cluster.log(n) for n in dead}
            kind = _PortTaken if any("Address already in use" in t for t in logs.values()) else RuntimeError
            raise kind(f"{', '.join(dead)} exited at start: " + "; ".join(f"{n}: {t[-2000:]}" for n, t in logs.items()))
        try:  # a client that finds nobody listening retries only a second later: the port first
            socket.create_connection(("127.0.0.1", ctld_port), timeout=1.0).close()
        except OSError:
            return None
        try:
            r = cluster.sinfo("-h", "-N", "-o", "%N %T", check=False, timeout=5)
        except subprocess.TimeoutExpired:
            return None
        return r.returncode == 0 and r.stdout.split() == [NODE, "idle"]

    try:
        cluster.procs["munged"] = _start_munged(d)
        ctld = [SLURMCTLD, "-D", "-i", "-f", str(conf)]
        cluster.procs["slurmctld"] = _daemon(ctld, env, d / "log" / "slurmctld.stderr")
        slurmd = [SLURMD, "-D", "-N", NODE, "-f", str(conf)]
        cluster.procs["slurmd"] = _daemon(slurmd, env, d / "log" / "slurmd.stderr")
        cluster.wait_for("the node idle in sinfo", idle, START_TIMEOUT)
    except BaseException as err:
        err.cluster = cluster
        raise
    cluster.started_s = time.monotonic() - t0
    return cluster


@contextmanager
def slurm_cluster(
    tmp: Path, cpus: int = 8, gpus: dict | None = None, extra_conf: str = "", conf_files: dict | None = None
):
    """munged, slurmctld and slurmd for one node under ``tmp/slurm``; yields a SlurmCluster
    once ``sinfo`` shows the node idle, and stops everything it started by pid at exit,
    also when the start fails or the body raises. ``cpus``: what the node declares
    (``SlurmdParameters=config_overrides``, whatever the machine has); ``gpus``: declared
    GPU types and counts (default ``GPUS``); ``extra_conf``: lines appended to slurm.conf;
    ``conf_files``: name -> text of more files beside slurm.conf, written before the daemons
    start (e.g. ``{"oci.conf": ...}`` for ``--container``, tests/support/slurm_oci.py)."""
    gpus = dict(GPUS if gpus is None else gpus)
    for exe in (SLURMCTLD, SLURMD, MUNGED):
        if not os.path.exists(exe):
            raise RuntimeError(f"{exe} is not installed: `make system-deps` installs Debian's slurm-wlm and munge")
    if os.geteuid() != 0:
        raise RuntimeError("the test Slurm runs its daemons as root (SlurmUser=root)")
    for attempt in range(3):  # ports are picked free, then bound by the daemons: a race, rarely lost
        try:
            d = Path(tmp) / ("slurm" if attempt == 0 else f"slurm-{attempt + 1}")
            cluster = _start(d, cpus, gpus, extra_conf, conf_files)
            break
        except _PortTaken as err:
            err.cluster.stop()
            if attempt == 2:
                raise
        except BaseException as err:
            if hasattr(err, "cluster"):
                err.cluster.stop()
            raise
    try:
        yield cluster
    finally:
        cluster.stop()
