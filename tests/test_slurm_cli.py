"""The Slurm backend's command layer (kernel_worker/backends/slurm_cli.py) against a real
one-node cluster: a job submitted, found by its name and comment, its queue place and
reason, cancelled; a request no node can serve refused at once in Slurm's words; the
partition's GPUs as Slurm declares them; a controller that does not answer bounded by the
timeout."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest
from support.slurm import slurm_cluster

from kernel_worker.backends.slurm_cli import SlurmCLI, SlurmError

HOLD = "#!/bin/sh\nexec sleep 600\n"
DEADLINE_S = 60


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm-cli")) as cluster:
        yield cluster


@pytest.fixture
def cli(slurm):
    cli = SlurmCLI(slurm.env, timeout=30)
    yield cli
    for job in asyncio.run(cli.jobs("")):  # leave the queue empty for the next test
        asyncio.run(cli.cancel(job.id))
    slurm.wait_for("an empty queue", lambda: not slurm.queue() or None, timeout=DEADLINE_S)


def until(what: str, probe):
    """``probe()``'s first true answer, polled with a deadline (Slurm has no events to wait on)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got = asyncio.run(probe())
        if got:
            return got
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.1)


def gpu_job(name: str, gres: str = "gpu:h100:1") -> list[str]:
    return [
        f"--job-name={name}",
        "--comment=jupyter-gpu:session=s1",
        f"--gres={gres}",
        "--partition=gpu",
        "--output=/dev/null",
    ]


def test_a_job_is_submitted_found_by_its_name_and_cancelled(cli):
    job_id = asyncio.run(cli.submit(HOLD, gpu_job("jgpu-s1")))
    assert re.fullmatch(r"\d+", job_id)
    job = until("running job", lambda: _running(cli, job_id))
    assert (job.name, job.comment, job.nodes) == ("jgpu-s1", "jupyter-gpu:session=s1", "localhost")
    [listed] = asyncio.run(cli.jobs("jgpu-"))
    assert (listed.id, listed.state, listed.comment) == (job_id, "RUNNING", "jupyter-gpu:session=s1")
    assert asyncio.run(cli.jobs("other-")) == []
    asyncio.run(cli.cancel(job_id))
    ended = until("cancelled job", lambda: _ended(cli, job_id))
    assert (ended.state, ended.exit_code) == ("CANCELLED", "0:15") and ended.ended
    asyncio.run(cli.cancel(job_id))  # again: not an error
    assert asyncio.run(cli.job("999999")) is None


async def _running(cli: SlurmCLI, job_id: str):
    job = await cli.job(job_id)
    return job if job is not None and job.state == "RUNNING" else None


async def _ended(cli: SlurmCLI, job_id: str):
    job = await cli.job(job_id)
    return job if job is not None and job.ended else None


def test_a_request_no_node_can_serve_is_refused_at_once(cli):
    with pytest.raises(SlurmError) as e:
        asyncio.run(cli.submit(HOLD, gpu_job("jgpu-big", "gpu:h100:3")))
    assert (
        e.value.never and e.value.text == "Batch job submission failed: Requested node configuration is not available"
    )
    assert asyncio.run(cli.gres("gpu")) == {"h100": 2, "a100": 1}


def test_a_job_behind_one_holding_the_gpus_has_a_place_and_a_reason(cli):
    holder = asyncio.run(cli.submit(HOLD, gpu_job("jgpu-a", "gpu:h100:2")))
    until("running holder", lambda: _running(cli, holder))
    waiting = asyncio.run(cli.submit(HOLD, gpu_job("jgpu-b")))

    async def resources():
        place = await cli.position(waiting, "gpu")
        return place if place is not None and place[2] == "Resources" else None

    assert until("queue reason", resources) == (1, 1, "Resources")
    assert asyncio.run(cli.position(holder, "gpu")) is None  # running, not in the queue
    asyncio.run(cli.cancel(holder))
    until("the waiting job running", lambda: _running(cli, waiting))


def test_a_controller_that_does_not_answer_ends_the_call_at_the_timeout(slurm, tmp_path):
    with socket.socket() as hung:  # listens, never answers: a slurmctld that hangs
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]
        conf = tmp_path / "slurm.conf"
        conf.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", f"SlurmctldPort={port}", slurm.conf.read_text()))
        cli = SlurmCLI({**slurm.env, "SLURM_CONF": str(conf)}, timeout=2)
        t0 = time.monotonic()
        with pytest.raises(SlurmError) as e:
            asyncio.run(cli.jobs("jgpu-"))
        took = time.monotonic() - t0
    assert (e.value.command, e.value.text) == ("squeue", "no answer within 2 s (is slurmctld up?)")
    assert 2 <= took < 10, took
