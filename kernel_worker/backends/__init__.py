"""Where a session's executor runs. The daemon picks one by name (``--backend``)."""

from __future__ import annotations

from kernel_worker.backends.base import Backend, WorkerExit, WorkerSpec


def backend_class(name: str) -> type[Backend]:
    if name == "process":
        from kernel_worker.backends.process import ProcessBackend

        return ProcessBackend
    if name == "docker":
        from kernel_worker.backends.docker import DockerBackend

        return DockerBackend
    if name == "slurm":
        from kernel_worker.backends.slurm import SlurmBackend

        return SlurmBackend
    raise ValueError(f"unknown backend {name!r}; this daemon has: process, docker, slurm")


__all__ = ["Backend", "WorkerExit", "WorkerSpec", "backend_class"]
