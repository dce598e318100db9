"""The Slurm gateway the notebook-level Slurm tests share: the one-node cluster of
tests/support/slurm.py (one per test module) and ``gateway``, a daemon with the slurm
backend in front of it; after each test Slurm's queue holds none of its jobs."""

from __future__ import annotations

import pytest

from support.daemons import start_daemon
from support.orphans import forget_daemon
from support.slurm import slurm_cluster

POLL_S = 0.2


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm-backend")) as cluster:
        yield cluster


@pytest.fixture
def gateway(slurm, tmp_path, runtime_dir, monkeypatch):
    """``start(*options)``: a daemon with the slurm backend (the login node's gateway);
    stopped afterwards, and then Slurm's queue holds none of its jobs."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    started = []

    def start(*options: str):
        d = start_daemon(
            tmp_path,
            "--backend=slurm",
            "--SlurmBackend.partition=gpu",
            f"--SlurmBackend.poll_interval={POLL_S}",
            "--SlurmBackend.gres_types={'H100': 'h100', 'A100': 'a100'}",
            "--WorkerDaemon.worker_heartbeat_interval=0.5",
            *options,
        )
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    forget_daemon(str(tmp_path / "daemon.json"))
    left = [j for j in slurm.queue() if j["name"].startswith("jgpu-")]
    assert not left, f"jobs left behind: {left}"
    others = [j["id"] for j in slurm.queue()]
    if others:
        slurm.scancel(*others)
    slurm.wait_for("an empty queue", lambda: not slurm.queue())


def our_jobs(slurm) -> list[dict]:
    return [j for j in slurm.queue() if j["name"].startswith("jgpu-")]


def running_job(slurm) -> dict:
    def running() -> list[dict]:
        return [j for j in our_jobs(slurm) if j["state"] == "RUNNING"]

    return slurm.wait_for("a running jgpu job", running)[0]
