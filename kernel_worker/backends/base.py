"""The backend interface: start, signal, stop and wait for one session's worker.

A backend must not assume the worker shares the daemon's host or filesystem beyond
what ``WorkerSpec`` says: the executor is told an address to dial back to and its
key through its environment, and everything else travels over the socket.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

from traitlets import Float, Unicode
from traitlets.config import LoggingConfigurable

from kernel_worker import protocol as P
from kernel_worker.inventory import GPU

SOCKET_NAME = "worker.sock"
GPU_DEVICES_ENV = "JUPYTER_GPU_DEVICES"  # MODEL:UUID,... of the GPUs a worker was given, or "cpu"
WORKSPACE_TARGET = "/workspace"  # where a container sees its session's workspace (the notebook's synced directory)
NO_VOLUMES = "volumes need the docker backend: run the daemon with `jupyter gpu daemon --backend docker`"


class VolumeError(ValueError):
    """A volume request that cannot be honoured; the message says why and what to do."""


# THE rule for a volume name, wherever one arrives (create, rm, du, --volume): checked before
# it reaches Docker or any other store. No '-': it separates the user from the name in the
# stored name, so ("alice", "bob-data") and ("alice-bob", "data") cannot meet. No '/' or '.':
# nothing path-like can reach an API URL or a file name (`x/../../volumes/...`). No ':': it
# separates NAME:/path:ro. Lowercase only: one spelling per name. 63 characters: a DNS label.
VOLUME_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_]{0,62}")
VOLUME_NAME_RULE = "1-63 lowercase letters, digits and '_', starting with a letter or digit (e.g. data, imagenet_2012)"


def shown(value: object, most: int = 40) -> str:
    """``value`` for an error message: its repr, cut short, so a hostile value stays small."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:most]) + ("..." if len(text) > most else "")


def check_volume_name(name: object, action: str = "use") -> str:
    """``name`` if it follows VOLUME_NAME_RULE, else a VolumeError naming it and what was
    asked (``action``: create, remove, mount). Every volume operation calls this first: a
    name is client-chosen and hostile."""
    if not isinstance(name, str) or not VOLUME_NAME_RE.fullmatch(name):
        raise VolumeError(f"cannot {action} volume {shown(name)}: a volume name is {VOLUME_NAME_RULE}")
    return name


@dataclass
class WorkerSpec:
    session: str
    gpus: list[GPU]
    env: dict[str, str]  # what every executor needs: session, key, flush and heartbeat settings
    socket_dir: str  # host directory holding this session's ipc socket (SOCKET_NAME), and only it
    bulk_dir: str  # host directory for this session's bulk buffers
    log_path: str  # where the worker's own diagnostics go
    user: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # per-cell backend options (image, volumes)

    def executor_env(self, socket_dir: str, bulk_dir: str) -> dict[str, str]:
        """The executor's environment, with the two directories as the worker sees them."""
        return {**self.env, P.Env.ENDPOINT: f"ipc://{socket_dir}/{SOCKET_NAME}", P.Env.BULK_DIR: bulk_dir}


@dataclass
class WorkerExit:
    code: int | None
    reason: str  # for people: "exited with code 1", "killed by SIGKILL"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "vanished"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Backend(LoggingConfigurable):
    """Runs executors. Implementations: ``process`` (this host), ``docker``, ``slurm``."""

    has_volumes = False  # whether the *_volume methods below are implemented
    dials_back = False  # workers run on other nodes and dial the daemon's CURVE tcp address
    schedules = False  # GPUs are placed by the backend's own scheduler (Slurm), not the daemon's
    name = "this"  # as `--backend` names it
    mounts_workspace = False  # whether a worker sees its workspace only if it was started with it
    # Set by the daemon: worker id -> host path of its session's workspace ('' for none).
    workspace_for: Callable[[str], str] | None = None
    # Set by the daemon: user -> host path of the user's package directory (`%gpu pip install`).
    packages_for: Callable[[str], str] | None = None

    orphan_timeout = Float(
        0.0, help="Seconds a worker waits for its daemon to come back after losing it, then exits."
    ).tag(config=True)
    daemon_id = Unicode(
        "", help="Names this daemon's workers, so a restarted daemon finds its own (set by the daemon)."
    )
    state_dir = Unicode("", help="The daemon's private state directory (set by the daemon).")

    @property
    def shares_files(self) -> bool:
        """Whether workers see the daemon host's files (bulk buffers, workspaces) at the
        same paths; otherwise every byte travels over the socket."""
        return True

    def inventory(self) -> list[GPU] | None:
        """The GPUs this backend's own scheduler offers, or None: the daemon asks pynvml
        (or its declared simulated inventory)."""
        return None

    def dial_back_url(self) -> str:
        """Where the daemon listens for workers that dial back (``dials_back``)."""
        raise NotImplementedError

    async def placed(self, handle: Any, on_wait: Callable[[str], None]) -> None:
        """Return once a started worker has its resources; a backend whose scheduler queues
        (Slurm) tells ``on_wait`` where it waits meanwhile, and raises if it never runs."""

    async def find(self) -> list[tuple[str, Any]]:
        """Workers of this daemon that outlived it: (session id, handle). None by default."""
        return []

    def is_running(self, handle: Any) -> bool:
        return False

    def started_with(self, handle: Any) -> dict | None:
        """What a found worker was started with, as the backend (not the worker) knows it:
        ``{"gpus": [uuid, ...], "user": name}``; None when it cannot tell. A restarted
        daemon checks its records against this before adopting."""
        return None

    # Volumes: only backends that can mount them implement these (blocking; run off the loop).
    def list_volumes(self, user: str | None) -> list[dict]:
        raise VolumeError(NO_VOLUMES)

    def create_volume(self, user: str, name: str) -> dict:
        raise VolumeError(NO_VOLUMES)

    def remove_volume(self, user: str, name: str) -> dict:
        raise VolumeError(NO_VOLUMES)

    def volume_usage(self, user: str) -> list[dict]:
        raise VolumeError(NO_VOLUMES)

    def refuse_options(self, spec: WorkerSpec, hint: str) -> None:
        """A backend without images and volumes refuses a cell that asks for them."""
        unsupported = sorted(k for k, v in spec.options.items() if v)
        if unsupported:
            asked = ", ".join("--" + k for k in unsupported)
            raise RuntimeError(f"the {self.name} backend cannot honour {asked}: {hint}")

    async def start(self, spec: WorkerSpec) -> Any:
        """Start the worker; return a handle. The executor connects back by itself."""
        raise NotImplementedError

    async def signal(self, handle: Any, signum: int) -> None:
        raise NotImplementedError

    async def stop(self, handle: Any) -> None:
        """Stop the worker for good (it may already be gone)."""
        raise NotImplementedError

    async def wait(self, handle: Any) -> WorkerExit:
        """Return once the worker has ended, however it ended."""
        raise NotImplementedError

    def worker_path(self, host_path: str, bulk_dir: str) -> str:
        """Where a worker whose bulk directory is ``bulk_dir`` sees ``host_path``: the same
        path on this host ("" for a worker that cannot see it)."""
        return host_path

    def workspace_cwd(self, host_path: str) -> str:
        """Where a worker sees the workspace at ``host_path``: the same path on this host."""
        return host_path

    def gpu_env(self, gpus: list[GPU]) -> dict[str, str]:
        """Pin exactly the assigned GPUs; simulated ones are only announced."""
        real = [g.uuid for g in gpus if not g.simulated]
        return {
            "CUDA_VISIBLE_DEVICES": ",".join(real),
            GPU_DEVICES_ENV: ",".join(f"{g.model}:{g.uuid}" for g in gpus) or "cpu",
        }
