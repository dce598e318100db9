"""One container per session: the user's image, exactly its GPUs, its volumes, nothing else.

The executor is injected: the ``kernel_worker`` package is bind-mounted read-only and run
with the image's own Python, so any image with python3, pyzmq and cloudpickle works. The
session's socket directory and bulk directory are the only host paths it sees; it talks
to the daemon over ipc, with no network needed (``network_mode`` is a trait).

Every container carries labels naming its daemon, session and user, so a restarted
daemon finds its own. Blocking Docker SDK calls run off the event loop.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
import re
from dataclasses import dataclass
from typing import Any

from traitlets import Bool, Dict, Float, Int, List, Unicode

from kernel_worker.backends.base import Backend, VolumeError, WorkerExit, WorkerSpec, describe_exit

LABEL_DAEMON = "jupyter-gpu.daemon"
LABEL_SESSION = "jupyter-gpu.session"
LABEL_USER = "jupyter-gpu.user"
LABEL_VOLUME = "jupyter-gpu.volume"
PKG_TARGET = "/opt/jupyter-gpu/kernel_worker"
SOCKET_TARGET = "/run/jupyter-gpu"
BULK_TARGET = "/run/jupyter-gpu-bulk"
_VOLUME_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,62}):(/[^:]*)(?::(ro|rw))?$")


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    path: str
    read_only: bool

    @classmethod
    def parse(cls, text: str) -> "VolumeSpec":
        m = _VOLUME_RE.match(text.strip())
        if not m:
            raise VolumeError(
                f"cannot read --volume {text!r}: write NAME:/path or NAME:/path:ro "
                "(NAME: letters, digits, '_', '.', '-')"
            )
        return cls(m.group(1), m.group(2), m.group(3) == "ro")


@dataclass
class Container:
    """A handle: the SDK object plus what we need to explain its end."""

    obj: Any
    log_path: str
    mem_limit: str


class DockerBackend(Backend):
    has_volumes = True

    image = Unicode("jupyter-gpu-worker:latest", help="Image for sessions that name none with --image.").tag(
        config=True
    )
    docker_url = Unicode(
        "", help="Docker engine to use (unix:///path.sock). Default: $DOCKER_HOST, else the local one."
    ).tag(config=True)
    network_mode = Unicode(
        "bridge", help="Container network: bridge lets cells download weights; none cuts them off."
    ).tag(config=True)
    mem_limit = Unicode("", help="Memory limit per worker container, e.g. 8g (empty: none).").tag(config=True)
    cpu_limit = Float(0.0, help="CPUs per worker container (0: no limit).").tag(config=True)
    pids_limit = Int(4096, help="Most processes a worker container may run.").tag(config=True)
    shm_size = Unicode("1g", help="/dev/shm size in worker containers (PyTorch data loaders need room).").tag(
        config=True
    )
    python = Unicode("python3", help="Python command inside images.").tag(config=True)
    volume_prefix = Unicode("jupyter-gpu", help="Prefix of the Docker volume names this daemon creates.").tag(
        config=True
    )
    stop_grace = Float(2.0, help="Seconds between SIGTERM and SIGKILL when stopping a container.").tag(config=True)
    run_as_daemon_user = Bool(True, help="Run containers as the daemon's uid:gid, so shared files keep one owner.").tag(
        config=True
    )
    extra_mounts = List(
        Unicode(), help="Host paths every worker gets, as HOST:CONTAINER[:ro] (shared datasets, a package dir)."
    ).tag(config=True)
    extra_env = Dict(
        value_trait=Unicode(), help="Environment for every worker; a PYTHONPATH here is appended to the executor's."
    ).tag(config=True)
    orphan_timeout = Float(
        600.0, help="Seconds a container waits for a restarted daemon to adopt it before exiting."
    ).tag(config=True)

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        import docker

        self._docker = docker
        self.client = docker.DockerClient(base_url=self.docker_url) if self.docker_url else docker.from_env()
        self._waiters = ThreadPoolExecutor(max_workers=256, thread_name_prefix="jgpu-docker-wait")

    # ------------------------------------------------------------------ volumes

    def volume_name(self, user: str, name: str) -> str:
        return f"{self.volume_prefix}-{user}-{name}"

    def _volume(self, user: str, name: str, create: bool) -> Any:
        full = self.volume_name(user, name)
        try:
            return self.client.volumes.get(full)
        except self._docker.errors.NotFound:
            if not create:
                raise VolumeError(f"you have no volume {name!r} (`jupyter gpu volumes ls` lists yours)") from None
        labels = {LABEL_DAEMON: self.daemon_id, LABEL_USER: user, LABEL_VOLUME: name}
        vol = self.client.volumes.create(full, labels=labels)
        if self.run_as_daemon_user and os.getuid() != 0:
            # New volumes belong to root; hand this one to the user who will write to it.
            self.client.containers.run(
                self.image,
                ["chown", f"{os.getuid()}:{os.getgid()}", "/v"],
                remove=True,
                user="0",
                network_mode="none",
                mounts=[self._docker.types.Mount("/v", full, type="volume")],
            )
        return vol

    def list_volumes(self, user: str | None) -> list[dict]:
        filters = {"label": [f"{LABEL_USER}={user}"] if user else [LABEL_USER]}
        in_use = self._volumes_in_use()
        out = []
        for v in self.client.volumes.list(filters=filters):
            labels = v.attrs.get("Labels") or {}
            out.append(
                {
                    "name": labels.get(LABEL_VOLUME, v.name),
                    "user": labels.get(LABEL_USER, ""),
                    "docker_name": v.name,
                    "created": v.attrs.get("CreatedAt", ""),
                    "in_use_by": in_use.get(v.name, []),
                }
            )
        return sorted(out, key=lambda v: (v["user"], v["name"]))

    def _volumes_in_use(self) -> dict[str, list[str]]:
        used: dict[str, list[str]] = {}
        for c in self.client.containers.list(filters={"label": LABEL_SESSION}):
            for m in c.attrs.get("Mounts", []):
                if m.get("Type") == "volume":
                    used.setdefault(m["Name"], []).append(c.labels.get(LABEL_SESSION, "?"))
        return used

    def create_volume(self, user: str, name: str) -> dict:
        if not _VOLUME_RE.match(f"{name}:/x"):
            raise VolumeError(
                f"cannot create volume {name[:80]!r}: a volume name is 1-63 letters, digits, '_', '.', '-' "
                "and starts with a letter or digit"
            )
        self._volume(user, name, create=True)
        return {"name": name}

    def remove_volume(self, user: str, name: str) -> dict:
        vol = self._volume(user, name, create=False)
        users = self._volumes_in_use().get(vol.name)
        if users:
            raise VolumeError(
                f"volume {name!r} is mounted by running session(s) {', '.join(u[:8] for u in users)}: "
                "release them first (`%gpu release`), then remove it"
            )
        vol.remove()
        return {"removed": name}

    def volume_usage(self, user: str) -> list[dict]:
        sizes = {v["Name"]: (v.get("UsageData") or {}).get("Size", -1) for v in self.client.df().get("Volumes") or []}
        return [{**v, "bytes": sizes.get(v["docker_name"], -1)} for v in self.list_volumes(user)]

    # ------------------------------------------------------------------ workers

    async def start(self, spec: WorkerSpec) -> Container:
        return await asyncio.to_thread(self._start, spec)

    def _start(self, spec: WorkerSpec) -> Container:
        d = self._docker
        image = spec.options.get("image") or self.image
        try:
            self.client.images.get(image)
        except d.errors.ImageNotFound:
            raise RuntimeError(
                f"image {image!r} is not on this GPU host: build or load it there first (`docker images` lists "
                "what it has); the daemon does not pull images"
            ) from None
        volumes = [VolumeSpec.parse(v) for v in spec.options.get("volumes") or []]
        paths = [v.path for v in volumes]
        if len(set(paths)) != len(paths):
            raise VolumeError(f"two volumes on one path: {', '.join(paths)}")
        mounts = [
            d.types.Mount(PKG_TARGET, _package_dir(), type="bind", read_only=True),
            d.types.Mount(SOCKET_TARGET, spec.socket_dir, type="bind"),
            d.types.Mount(BULK_TARGET, spec.bulk_dir, type="bind"),
        ]
        for v in volumes:
            vol = self._volume(spec.user, v.name, create=True)
            mounts.append(d.types.Mount(v.path, vol.name, type="volume", read_only=v.read_only))
        for extra in self.extra_mounts:
            host, _, rest = extra.partition(":")
            target, _, mode = rest.partition(":")
            mounts.append(d.types.Mount(target, host, type="bind", read_only=mode == "ro"))
        env = {
            **self.extra_env,
            **self.gpu_env(spec.gpus),
            **spec.executor_env(SOCKET_TARGET, BULK_TARGET),
            "PYTHONPATH": ":".join(filter(None, [os.path.dirname(PKG_TARGET), self.extra_env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "HOME": "/tmp",
            "JUPYTER_GPU_IMAGE": image,
        }
        real = [g.uuid for g in spec.gpus if not g.simulated]
        devices = [d.types.DeviceRequest(device_ids=real, capabilities=[["gpu"]])] if real else []
        kw: dict = {}
        if self.mem_limit:
            kw["mem_limit"] = self.mem_limit
            kw["memswap_limit"] = self.mem_limit  # no swap: over the limit is an OOM kill, not a crawl
        if self.cpu_limit:
            kw["nano_cpus"] = int(self.cpu_limit * 1e9)
        if self.run_as_daemon_user:
            kw["user"] = f"{os.getuid()}:{os.getgid()}"
        try:
            obj = self.client.containers.run(
                image,
                [self.python, "-m", "kernel_worker.worker"],
                detach=True,
                name=f"jupyter-gpu-{spec.session[:24]}",
                labels={LABEL_DAEMON: self.daemon_id, LABEL_SESSION: spec.session, LABEL_USER: spec.user},
                environment=env,
                mounts=mounts,
                network_mode=self.network_mode,
                device_requests=devices,
                pids_limit=self.pids_limit,
                shm_size=self.shm_size,
                working_dir="/tmp",
                init=True,  # a real PID 1: reaps `!cmd` children, forwards signals, lets a crash be a crash
                **kw,
            )
        except d.errors.APIError as e:
            explanation = getattr(e, "explanation", None) or str(e)
            if "executable file not found" in explanation or "no such file" in explanation.lower():
                raise RuntimeError(
                    f"image {image!r} has no {self.python!r}: the executor runs on the image's own Python; "
                    f"use an image with python3, pyzmq and cloudpickle, or `jupyter gpu image build --from {image}`"
                ) from None
            raise RuntimeError(f"docker could not start the worker container: {explanation}") from None
        return Container(obj, spec.log_path, self.mem_limit)

    async def signal(self, handle: Container, signum: int) -> None:
        try:
            await asyncio.to_thread(handle.obj.kill, signum)
        except self._docker.errors.APIError:
            pass  # already gone: the watcher reports it

    async def stop(self, handle: Container) -> None:
        def stop() -> None:
            try:
                handle.obj.stop(timeout=self.stop_grace)
            except self._docker.errors.APIError:
                pass
            self._save_logs(handle)
            try:
                handle.obj.remove(force=True)
            except self._docker.errors.NotFound:
                pass

        await asyncio.to_thread(stop)

    async def wait(self, handle: Container) -> WorkerExit:
        def wait() -> WorkerExit:
            try:
                code = handle.obj.wait()["StatusCode"]
                handle.obj.reload()
                state = handle.obj.attrs.get("State", {})
            except self._docker.errors.NotFound:
                return WorkerExit(None, "container was removed")
            self._save_logs(handle)
            if state.get("OOMKilled"):
                limit = f", limit {_human(handle.mem_limit)}" if handle.mem_limit else ""
                return WorkerExit(code, f"container was killed: out of memory{limit}")
            reason = describe_exit(128 - code if code > 128 else code)  # 137 = 128 + SIGKILL
            return WorkerExit(code, f"container {reason}")

        # Each wait blocks a thread for the container's whole life: keep them out of the
        # shared pool, where they would queue the kills and starts that must be quick.
        return await asyncio.get_running_loop().run_in_executor(self._waiters, wait)

    def _save_logs(self, handle: Container) -> None:
        if not handle.log_path:
            return  # a leftover being removed: nobody will read its log
        try:
            data = handle.obj.logs(stdout=True, stderr=True)
        except self._docker.errors.APIError:
            return
        with open(handle.log_path, "wb") as f:
            f.write(data)

    # ------------------------------------------------------------------ restart

    async def find(self) -> list[tuple[str, Container]]:
        """This daemon's containers that still exist: (session id, handle)."""

        def find() -> list:
            found = self.client.containers.list(all=True, filters={"label": f"{LABEL_DAEMON}={self.daemon_id}"})
            return [(c.labels.get(LABEL_SESSION, ""), Container(c, "", self.mem_limit)) for c in found]

        return await asyncio.to_thread(find)

    def is_running(self, handle: Container) -> bool:
        return handle.obj.status == "running"


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _human(limit: str) -> str:
    m = re.match(r"^(\d+)([kmgKMG]?)[bB]?$", limit)
    if not m:
        return limit
    unit = {"": "B", "k": "KiB", "m": "MiB", "g": "GiB"}[m.group(2).lower()]
    return f"{m.group(1)} {unit}"
