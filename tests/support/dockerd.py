"""A real Docker engine for the tests: Debian's dockerd on its own socket and data root,
and test images made from a debootstrap root file system (``make test-image``), never
pulled from a registry."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

from .paths import ROOT
from .procs import stop_process

ROOTFS_TAR = ROOT / ".cache" / "rootfs-bookworm.tar"
IMAGE = "jupyter-gpu-test:bookworm"  # python3, pyzmq, and the notebook's own cloudpickle
IMAGE_NOZMQ = "jupyter-gpu-test:nozmq"  # pyzmq removed
IMAGE_OLDPICKLE = "jupyter-gpu-test:oldpickle"  # Debian's cloudpickle 2.x
START_TIMEOUT = 60


@dataclass
class Engine:
    proc: subprocess.Popen
    url: str
    client: object
    data: Path
    lock: int  # fd holding the data root's lock; -1 for a data root of this run's own

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc, 30)
        if self.lock >= 0:
            os.close(self.lock)  # releases the shared data root for the next run
        else:
            shutil.rmtree(self.data, ignore_errors=True)


def _data_root() -> tuple[Path, int]:
    """The shared data root (outside the work tree, kept for its images) when no other test
    run holds it; else a fresh one of this run's own, so two runs at once never meet."""
    shared = Path(tempfile.gettempdir()) / "jupyter-gpu-test-docker"
    shared.mkdir(parents=True, exist_ok=True)
    fd = os.open(shared.parent / f"{shared.name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return shared, fd
    except BlockingIOError:
        os.close(fd)
        return Path(tempfile.mkdtemp(prefix="jgpu-docker-data-")), -1


def start_engine(log) -> Engine:  # noqa: ANN001
    """dockerd without networking of its own, on a private socket. ``log`` is a LogWatcher factory."""
    import docker

    if shutil.which("dockerd") is None:
        raise RuntimeError("dockerd is not installed: `make test` installs Debian's docker.io")
    run = Path(tempfile.mkdtemp(prefix="jgpu-dockerd-"))
    data, lock = _data_root()
    url = f"unix://{run}/docker.sock"
    proc = subprocess.Popen(
        [
            shutil.which("dockerd"),
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            f"--data-root={data}",
            f"--exec-root={run}/exec",
            f"--pidfile={run}/docker.pid",
            f"--host={url}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    watcher = log(proc.stderr, run / "dockerd.log")
    try:
        watcher.wait_for(r"API listen on", timeout=START_TIMEOUT)
    except AssertionError:
        Engine(proc, url, _NoClient(), data, lock).stop()
        raise
    client = docker.DockerClient(base_url=url, timeout=120)
    # The shared data root is reused between runs (it caches the images): start from no leftovers.
    for c in client.containers.list(all=True):
        c.remove(force=True)
    for v in client.volumes.list():
        v.remove(force=True)
    return Engine(proc, url, client, data, lock)


class _NoClient:
    def close(self) -> None:
        pass


def ensure_images(client, url: str) -> None:  # noqa: ANN001
    """Import the debootstrap root file system once, then derive the variants from it."""
    import docker

    def have(tag: str) -> bool:
        try:
            client.images.get(tag)
            return True
        except docker.errors.ImageNotFound:
            return False

    if not have(IMAGE_OLDPICKLE):
        if not ROOTFS_TAR.exists():
            raise RuntimeError(f"{ROOTFS_TAR} is missing: `make test-image` builds it with debootstrap")
        subprocess.run(
            ["docker", "-H", url, "import", str(ROOTFS_TAR), IMAGE_OLDPICKLE],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
    if not have(IMAGE):
        # The notebook's cloudpickle (pure Python) where the image's Python finds it first.
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(os.path.dirname(cloudpickle.__file__), arcname="cloudpickle")
        c = client.containers.create(IMAGE_OLDPICKLE, ["true"])
        try:
            c.put_archive("/usr/local/lib/python3.11/dist-packages", buf.getvalue())
            c.commit("jupyter-gpu-test", "bookworm")
        finally:
            c.remove(force=True)
    if not have(IMAGE_NOZMQ):
        c = client.containers.run(
            IMAGE, ["rm", "-rf", "/usr/lib/python3/dist-packages/zmq"], detach=True, network_mode="none"
        )
        try:
            c.wait()
            c.commit("jupyter-gpu-test", "nozmq")
        finally:
            c.remove(force=True)
