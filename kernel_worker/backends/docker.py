"""One container per session: the user's image, exactly its GPUs, its volumes, nothing else.

The executor is injected: the ``kernel_worker`` package is bind-mounted read-only and run
with the image's own Python, so any image with python3, pyzmq and cloudpickle works. The
session's socket directory and bulk directory are the only host paths it sees; it talks
to the daemon over ipc, with no network needed (``network_mode`` is a trait).

A container gets no capabilities (``cap_drop=ALL``, ``cap_add`` gives some back),
``no-new-privileges``, and a numeric user (``user``; by default the daemon's own uid, the
owner of the directories it shares with the worker). Volume names, mount paths and image
names come from clients: each is checked against one rule before it reaches Docker, and a
volume is used only if its labels say it is the asking user's.

Every container carries labels naming its daemon, session and user, so a restarted
daemon finds its own. Blocking Docker SDK calls run off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from traitlets import Dict, Float, Int, List, TraitError, Unicode, validate

from kernel_worker.backends.base import (
    GPU_DEVICES_ENV,
    SOCKET_NAME,
    WORKSPACE_TARGET,
    Backend,
    VolumeError,
    WorkerExit,
    WorkerSpec,
    describe_exit,
    shown,
)
from kernel_worker.backends.docker_rules import (
    BULK_TARGET,
    CAPABILITY_GIVES,
    IMAGE_RE,
    LINUX_CAPABILITIES,
    NO_NEW_PRIVILEGES,
    PKG_TARGET,
    SOCKET_TARGET,
    UID_GID_RE,
    USER_PACKAGES_TARGET,
    VolumeSpec,
)
from kernel_worker.backends.docker_volumes import LABEL_DAEMON, LABEL_SESSION, LABEL_USER, DockerVolumes

__all__ = ["DockerBackend", "LABEL_DAEMON", "LABEL_SESSION", "LABEL_USER"]

MOST_VOLUMES = 32  # per session


@dataclass
class Container:
    """A handle: the SDK object plus what we need to explain its end."""

    obj: Any
    log_path: str
    mem_limit: str


class DockerBackend(DockerVolumes, Backend):
    name = "docker"
    has_volumes = True
    mounts_workspace = True

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
    user = Unicode(
        "",
        help="UID:GID (numbers) that cells run as in worker containers. Empty: the daemon's own uid:gid, which owns "
        "the socket and bulk directories the worker shares (0700) and the bulk files same-host notebooks write "
        "(0600), so everything works; under a root daemon that is uid 0, though with no capabilities and "
        "no-new-privileges: run the daemon as a non-root user in the docker group to have cells run as that user. "
        "Another uid (e.g. 65534:65534) needs a root daemon, which hands it the session's directories at start "
        "and the user's workspace and package directories (each still 0700, inside the daemon's own 0700 "
        "directories, so no other user of the host reaches them); "
        "then values of 1 MiB or more sent by notebooks running as root on this host cannot be loaded, and "
        "workers are not adopted after a daemon restart (the daemon does not yet hand over bulk files and "
        "re-bound sockets).",
    ).tag(config=True)
    cap_add = List(
        Unicode(),
        help="Linux capabilities given back to worker containers, which start with none (cap_drop=ALL). Each "
        "one added gives cells: "
        + "; ".join(f"{k}: {v}" for k, v in CAPABILITY_GIVES.items())
        + ". They take effect for cells running as uid 0 (see DockerBackend.user); a non-root user gets none "
        "(Docker grants no ambient capabilities, and no-new-privileges ignores file capabilities).",
    ).tag(config=True)
    allowed_images = List(
        Unicode(),
        help="Images a cell may name with --image, as written there (e.g. pytorch-cuda:2.4); DockerBackend.image "
        "is always allowed. Empty: any image present on this host, which lets every user run any image the "
        "engine has, e.g. one with tools or data the operator did not mean for them.",
    ).tag(config=True)
    extra_mounts = List(
        Unicode(), help="Host paths every worker gets, as HOST:CONTAINER[:ro] (shared datasets, a package dir)."
    ).tag(config=True)
    extra_env = Dict(
        value_trait=Unicode(), help="Environment for every worker; a PYTHONPATH here is appended to the executor's."
    ).tag(config=True)
    orphan_timeout = Float(
        600.0, help="Seconds a container waits for a restarted daemon to adopt it before exiting."
    ).tag(config=True)

    @validate("user")
    def _valid_user(self, proposal: Any) -> str:
        value = proposal["value"].strip()
        if value and not UID_GID_RE.fullmatch(value):
            raise TraitError(f"DockerBackend.user must be UID:GID in numbers, e.g. 65534:65534, not {shown(value)}")
        return value

    @validate("cap_add")
    def _valid_caps(self, proposal: Any) -> list[str]:
        caps = [c.strip().upper().removeprefix("CAP_") for c in proposal["value"]]
        unknown = [c for c in caps if c not in LINUX_CAPABILITIES]
        if unknown:
            raise TraitError(
                f"DockerBackend.cap_add: {', '.join(map(shown, unknown))} is not a Linux capability name "
                "(e.g. SYS_PTRACE, SYS_NICE, IPC_LOCK)"
            )
        return caps

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        import docker

        from kernel_worker.daemon.errors import StartRefused

        uid, _ = self.ids()
        if uid != os.getuid() and os.getuid() != 0:
            raise StartRefused(
                f"DockerBackend.user={self.user} is not this daemon's uid ({os.getuid()}): only a daemon running as "
                "root can give another uid its workers' socket and bulk directories. Leave DockerBackend.user empty "
                "(cells then run as the daemon's own uid)"
            )
        if uid == 0:
            self.log.warning(
                "worker containers run as uid 0 (%s), without capabilities and with no-new-privileges; run the "
                "daemon as a non-root user in the docker group so that cells run as that user",
                "DockerBackend.user" if self.user else "this daemon's own uid",
            )
        self._docker = docker
        self.client = docker.DockerClient(base_url=self.docker_url) if self.docker_url else docker.from_env()
        self._waiters = ThreadPoolExecutor(max_workers=256, thread_name_prefix="jgpu-docker-wait")

    def ids(self) -> tuple[int, int]:
        """The uid and gid cells run as: DockerBackend.user, else the daemon's own."""
        m = UID_GID_RE.fullmatch(self.user)
        return (int(m.group(1)), int(m.group(2))) if m else (os.getuid(), os.getgid())

    worker_owner = ids  # who must own the user's directories a container mounts (see docker_owner)

    def _reserved_paths(self) -> list[str]:
        """Container paths of the operator's extra_mounts: no volume goes on, above or under them."""
        return [extra.partition(":")[2].partition(":")[0] for extra in self.extra_mounts]

    # ------------------------------------------------------------------ workers

    def check_image(self, requested: object) -> str:
        """The image a session asks for, if it may have it: a well-formed reference (it
        reaches the Engine API's URLs), and in allowed_images when the operator set one."""
        if requested is None or requested == "":
            return self.image
        if not isinstance(requested, str) or not IMAGE_RE.fullmatch(requested):
            raise RuntimeError(
                f"bad image name {shown(requested)}: write a Docker image reference such as "
                "pytorch-cuda:2.4 or registry.example:5000/team/image:tag"
            )
        if self.allowed_images and requested not in self.allowed_images and requested != self.image:
            allowed = list(dict.fromkeys([self.image, *self.allowed_images]))
            raise RuntimeError(
                f"image {requested!r} is not allowed on this GPU host: use one of {', '.join(map(repr, allowed))} "
                "(the operator's DockerBackend.allowed_images)"
            )
        return requested

    def check_volumes(self, requested: object) -> list[VolumeSpec]:
        """The --volume options a session asks for, each name and path checked, no two on one path."""
        if requested is None:
            return []
        if not isinstance(requested, list) or len(requested) > MOST_VOLUMES:
            raise VolumeError(f"volumes must be a list of at most {MOST_VOLUMES} NAME:/path entries")
        volumes = [VolumeSpec.parse(v, self._reserved_paths()) for v in requested]
        paths = [v.path for v in volumes]
        if len(set(paths)) != len(paths):
            raise VolumeError(f"two volumes on one path: {', '.join(paths)}")
        return volumes

    def workspace_cwd(self, host_path: str) -> str:
        return WORKSPACE_TARGET

    def worker_path(self, host_path: str, bulk_dir: str) -> str:
        """Of the host, a container sees its bulk directory (and mounts): a snapshot goes through it."""
        rel = os.path.relpath(host_path, bulk_dir)
        return "" if rel == ".." or rel.startswith("../") else os.path.normpath(os.path.join(BULK_TARGET, rel))

    def _workspace_mount(self, spec: WorkerSpec, volumes: list[VolumeSpec]) -> list:
        """The session's own workspace (and no other), read-write at WORKSPACE_TARGET."""
        host = self.workspace_for(spec.session) if self.workspace_for is not None else ""
        if not host:
            return []
        for v in volumes:
            if v.path == WORKSPACE_TARGET or (v.path + "/").startswith(WORKSPACE_TARGET + "/"):
                raise VolumeError(
                    f"--volume {v.name}:{v.path} would cover the notebook's synced directory at {WORKSPACE_TARGET}: "
                    "mount it elsewhere, or use --no-sync"
                )
            if WORKSPACE_TARGET.startswith(v.path.rstrip("/") + "/"):
                raise VolumeError(f"--volume {v.name}:{v.path} would hold {WORKSPACE_TARGET}: mount it elsewhere")
        return [self._docker.types.Mount(WORKSPACE_TARGET, host, type="bind")]

    async def start(self, spec: WorkerSpec) -> Container:
        return await asyncio.to_thread(self._start, spec)

    def _start(self, spec: WorkerSpec) -> Container:
        d = self._docker
        image = self.check_image(spec.options.get("image"))
        volumes = self.check_volumes(spec.options.get("volumes"))
        try:
            self.client.images.get(image)
        except d.errors.ImageNotFound:
            raise RuntimeError(
                f"image {image!r} is not on this GPU host: build or load it there first (`docker images` lists "
                "what it has); the daemon does not pull images"
            ) from None
        uid, gid = self.ids()
        if uid != os.getuid():
            self._hand_dirs_to(spec, uid, gid)
        mounts = [
            d.types.Mount(PKG_TARGET, _package_dir(), type="bind", read_only=True),
            d.types.Mount(SOCKET_TARGET, spec.socket_dir, type="bind"),
            d.types.Mount(BULK_TARGET, spec.bulk_dir, type="bind"),
        ]
        workspace = self._workspace_mount(spec, volumes)
        mounts += workspace
        packages = self.packages_for(spec.user) if self.packages_for is not None else ""  # `%gpu pip install`
        if packages:
            mounts.append(d.types.Mount(USER_PACKAGES_TARGET, packages, type="bind", read_only=True))
        for v in volumes:
            vol = self._volume(spec.user, v.name, create=True, action="mount")
            mounts.append(d.types.Mount(v.path, vol.name, type="volume", read_only=v.read_only))
        for extra in self.extra_mounts:
            host, _, rest = extra.partition(":")
            target, _, mode = rest.partition(":")
            mounts.append(d.types.Mount(target, host, type="bind", read_only=mode == "ro"))
        env = {
            **self.extra_env,
            **self.gpu_env(spec.gpus),
            **spec.executor_env(SOCKET_TARGET, BULK_TARGET),
            "PYTHONPATH": ":".join(
                filter(
                    None,
                    [
                        os.path.dirname(PKG_TARGET),
                        USER_PACKAGES_TARGET if packages else "",
                        self.extra_env.get("PYTHONPATH"),
                    ],
                )
            ),
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
        name = f"jupyter-gpu-{spec.session[:24]}"
        try:
            obj = self.client.containers.run(
                image,
                [self.python, "-m", "kernel_worker.worker"],
                detach=True,
                name=name,
                labels={LABEL_DAEMON: self.daemon_id, LABEL_SESSION: spec.session, LABEL_USER: spec.user},
                environment=env,
                mounts=mounts,
                network_mode=self.network_mode,
                device_requests=devices,
                pids_limit=self.pids_limit,
                shm_size=self.shm_size,
                working_dir=WORKSPACE_TARGET if workspace else "/tmp",
                init=True,  # a real PID 1: reaps `!cmd` children, forwards signals, lets a crash be a crash
                user=f"{uid}:{gid}",
                cap_drop=["ALL"],
                cap_add=self.cap_add or None,
                security_opt=[NO_NEW_PRIVILEGES],
                **kw,
            )
        except d.errors.APIError as e:
            self._remove_unstarted(name)
            explanation = getattr(e, "explanation", None) or str(e)
            if "executable file not found" in explanation or "no such file" in explanation.lower():
                raise RuntimeError(
                    f"image {image!r} has no {self.python!r}: the executor runs on the image's own Python; "
                    f"use an image with python3, pyzmq and cloudpickle, or `jupyter gpu image build --from {image}`"
                ) from None
            raise RuntimeError(f"docker could not start the worker container: {explanation}") from None
        return Container(obj, spec.log_path, self.mem_limit)

    def _remove_unstarted(self, name: str) -> None:
        """``containers.run`` creates, then starts: a start that failed leaves a created
        container behind (its mounts gone, say, because the session was released meanwhile)."""
        try:
            self.client.containers.get(name).remove(force=True)
        except self._docker.errors.NotFound:
            pass

    @staticmethod
    def _hand_dirs_to(spec: WorkerSpec, uid: int, gid: int) -> None:
        """Give a worker that runs as another uid than the daemon (a root daemon with
        DockerBackend.user set) its socket and bulk directories: they are 0700 and the
        socket is the umask's, so without this it could not even connect."""
        for path in (spec.socket_dir, os.path.join(spec.socket_dir, SOCKET_NAME), spec.bulk_dir):
            try:
                os.chown(path, uid, gid, follow_symlinks=False)
            except FileNotFoundError:
                pass

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

    def started_with(self, handle: Container) -> dict:
        """From the container's configuration, which the daemon set and the container cannot
        change: the GPUs announced to it, and the user label."""
        env = dict(e.partition("=")[::2] for e in handle.obj.attrs.get("Config", {}).get("Env") or [])
        devices = env.get(GPU_DEVICES_ENV, "")
        gpus = [d.partition(":")[2] for d in devices.split(",")] if devices not in ("", "cpu") else []
        return {"gpus": gpus, "user": handle.obj.labels.get(LABEL_USER, "")}


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _human(limit: str) -> str:
    m = re.match(r"^(\d+)([kmgKMG]?)[bB]?$", limit)
    if not m:
        return limit
    unit = {"": "B", "k": "KiB", "m": "MiB", "g": "GiB"}[m.group(2).lower()]
    return f"{m.group(1)} {unit}"
