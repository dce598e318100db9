"""Slurm's command line as the Slurm backend uses it: ``sbatch``, ``squeue``, ``scontrol``,
``scancel``, ``sinfo``. Every call is a subprocess awaited off the event loop, with a
timeout (a hung slurmctld never hangs the daemon), parsable output, and errors that say
what Slurm said.

The CLI, not pyslurm: pyslurm must be built against the cluster's exact Slurm version
(its wheels do not exist for most), while the CLI is what every cluster's login node has,
and its parsable formats have been stable for years.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass

JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")
NEVER = "Requested node configuration is not available"  # sbatch: what can never run here
FIELD = "|"  # squeue's field separator in the formats below


class SlurmError(Exception):
    """A Slurm command failed; the message is Slurm's own words and the command."""

    def __init__(self, command: str, text: str):
        super().__init__(f"{command}: {text}")
        self.command, self.text = command, text

    @property
    def never(self) -> bool:
        """The request can never run on this cluster (no node has what it asks)."""
        return NEVER in self.text


@dataclass
class Job:
    id: str
    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, FAILED, NODE_FAIL, PREEMPTED...
    reason: str
    name: str = ""
    comment: str = ""
    nodes: str = ""
    exit_code: str = ""

    @property
    def ended(self) -> bool:
        return self.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")


class SlurmCLI:
    def __init__(self, env: dict | None = None, timeout: float = 30.0):
        self.env = {**os.environ, **(env or {})}
        self.timeout = timeout

    async def run(self, *argv: str, stdin: str | None = None) -> str:
        """``argv``'s stdout; SlurmError with its stderr when it fails or takes too long."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), self.timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmError(argv[0], f"no answer within {self.timeout:g} s (is slurmctld up?)") from None
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise SlurmError(argv[0], text.removeprefix(f"{argv[0]}: error: "))
        return out.decode(errors="replace")

    async def submit(self, script: str, options: list[str]) -> str:
        """Submit a batch ``script`` (given on stdin) with ``options``; its job id."""
        out = await self.run("sbatch", "--parsable", *options, stdin=script)
        job_id = out.strip().split(";")[0]  # "ID" or "ID;cluster"
        if not JOB_ID_RE.match(job_id):
            raise SlurmError("sbatch", f"answered {out.strip()[:80]!r}, not a job id")
        return job_id

    async def job(self, job_id: str) -> Job | None:
        """What Slurm says of a job now, or None once it has forgotten it (``MinJobAge``)."""
        try:
            out = await self.run("scontrol", "show", "job", "-o", job_id)
        except SlurmError as e:
            if "Invalid job id" in e.text:
                return None
            raise
        f = parse_fields(out)
        return Job(
            job_id,
            f.get("JobState", "UNKNOWN"),
            f.get("Reason", ""),
            f.get("JobName", ""),
            f.get("Comment", ""),
            f.get("NodeList", ""),
            f.get("ExitCode", ""),
        )

    async def jobs(self, name_prefix: str, user: str = "", ended_too: bool = False) -> list[Job]:
        """Live jobs whose name starts with ``name_prefix`` (a restarted daemon's own), of
        ``user`` only when given (another user may name a job as ours); with ``ended_too``,
        also those that ended recently (still in slurmctld's memory)."""
        who = ["-u", user] if user else []
        states = ["-t", "all"] if ended_too else []
        out = await self.run("squeue", "-h", *who, *states, "-o", FIELD.join(("%i", "%T", "%r", "%j", "%k", "%N")))
        found = []
        for line in out.splitlines():
            parts = line.split(FIELD)
            if len(parts) == 6 and parts[3].startswith(name_prefix):
                found.append(Job(*parts[:2], parts[2], parts[3], parts[4], parts[5]))
        return found

    async def position(self, job_id: str, partition: str) -> tuple[int, int, str] | None:
        """(place, of how many, reason) of a pending job in its partition's queue, in the
        scheduler's order (priority, then id); None when it is not pending."""
        out = await self.run(
            "squeue", "-h", "-t", "PENDING", "-p", partition, "--sort=-p,i", "-o", FIELD.join(("%i", "%r"))
        )
        pending = [line.split(FIELD) for line in out.splitlines() if FIELD in line]
        for i, (jid, reason) in enumerate(pending, 1):
            if jid == job_id:
                return i, len(pending), reason
        return None

    async def cancel(self, job_id: str) -> None:
        """End a job (a job Slurm has already forgotten is not an error)."""
        try:
            await self.run("scancel", job_id)
        except SlurmError as e:
            if "Invalid job id" not in e.text:
                raise

    async def gres(self, partition: str) -> dict[str, int]:
        """GPUs per type on the partition's nodes ('': every partition), as Slurm declares
        them: ``{"h100": 2}``."""
        return gres_totals(await self.run(*gres_argv(partition)))


def gres_argv(partition: str) -> list[str]:
    """``sinfo`` listing each node once with its gres, of ``partition`` ('': all)."""
    return ["sinfo", "-h", "-N", *(["-p", partition] if partition else []), "-o", FIELD.join(("%N", "%G"))]


def gres_totals(sinfo: str) -> dict[str, int]:
    """``gres_argv``'s output summed per GPU type, each node counted once (a node in two
    partitions is listed twice)."""
    total: dict[str, int] = {}
    seen = set()
    for line in sinfo.splitlines():
        node, _, gres = line.partition(FIELD)
        if node in seen:
            continue
        seen.add(node)
        for kind, count in parse_gres(gres).items():
            total[kind] = total.get(kind, 0) + count
    return total


def parse_fields(text: str) -> dict[str, str]:
    """``scontrol show ... -o``'s ``Key=Value Key=Value`` line (a value may hold spaces
    only at the end of the line, which Slurm keeps for Command= and such)."""
    out: dict[str, str] = {}
    for token in re.split(r" (?=[A-Za-z/:]+=)", text.strip()):
        key, eq, value = token.partition("=")
        if eq:
            out[key] = value.strip()
    return out


def parse_gres(text: str) -> dict[str, int]:
    """``gpu:h100:2(S:0),gpu:a100:1`` -> ``{"h100": 2, "a100": 1}`` (an untyped ``gpu:4``
    counts under "")."""
    out: dict[str, int] = {}
    for item in text.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] != "gpu" or len(parts) < 2 or not parts[-1].isdigit():
            continue
        kind = parts[1] if len(parts) == 3 else ""
        out[kind] = out.get(kind, 0) + int(parts[-1])
    return out
