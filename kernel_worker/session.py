"""A session: one notebook's worker, its GPUs, and the request it is serving; plus the
rule for whether values can travel between a notebook and a worker at all."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from kernel_worker import inventory, scheduler
from kernel_worker import protocol as P
from kernel_worker.inventory import GPU

WARM_PREFIX = "warm-"  # a warm pool worker's id, and its holder name in the scheduler


@dataclass(eq=False)
class Session:
    id: str
    request: scheduler.Request
    key: bytes
    signer: P.Signer
    client: bytes = b""  # routing id of the notebook this session answers
    gpus: list[GPU] = field(default_factory=list)
    handle: Any = None
    state: str = "starting"  # starting | idle | busy
    queued: bool = False  # waiting in the GPU queue
    ready: asyncio.Future | None = None
    current: P.Message | None = None  # the request being served
    cell_started: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0  # seconds its cells ran
    billed_s: float = 0.0  # seconds its cells were billed (rounded as the host bills)
    budgets: dict = field(default_factory=dict)  # the limits its notebook asked for (daemon.budgets)
    stopped: str = ""  # why the daemon stopped its running cell (a budget), for its cost line
    source: str = ""  # a hash of the running cell's code: its estimate next time
    estimate: dict | None = None  # the running cell's last run (same source, spec, notebook)
    cells: list[dict] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    telemetry: inventory.Sample = field(default_factory=inventory.Sample)
    tasks: set = field(default_factory=set)
    releasing: bool = False
    moving: bool = False  # released for a new worker of the same session (another GPU): its bulk files stay
    cell_done: asyncio.Event = field(default_factory=asyncio.Event)
    user: str = ""
    notebook: str = ""  # the notebook's path as its kernel knows it, for spend per notebook
    watcher: asyncio.Task | None = None
    wid: str = ""  # the worker's own id (socket, log, container): the session id, or a warm worker's
    log: Any = None  # journal.Journal of the current (or last) cell's output, for whoever reconnects
    answer: P.Message | None = None  # the request its output answers when not ``current`` (an ATTACH)
    claim: tuple | None = None  # (client, request id, seen) of a ping that came before the adopted worker
    client_seen: float = 0.0  # its kernel's last keepalive (0: it never sent one)
    detached: bool = False  # its kernel stopped its keepalives
    late: list = field(default_factory=list)  # output written after its cell returned, for the next cell
    waiting: set = field(default_factory=set)  # ids of requests that wait for its adopted worker
    adopted: bool = False  # its worker outlived a daemon restart (its running cell may be billed already)

    def __post_init__(self) -> None:
        self.wid = self.wid or self.id

    @property
    def device(self) -> str:
        return self.gpus[0].model if self.gpus else inventory.CPU


def version_mismatch(client: dict, worker: dict) -> str:
    """Why values could not travel between these two sides, or "" when they can."""

    def part(v: str | None, n: int) -> str:
        return ".".join((v or "?").split(".")[:n])

    problems = []
    if client.get("python") and part(client["python"], 2) != part(worker.get("python"), 2):
        problems.append(f"Python {client['python']} in the notebook, Python {worker.get('python')} on the worker")
    if client.get("cloudpickle") and part(client["cloudpickle"], 1) != part(worker.get("cloudpickle"), 1):
        problems.append(
            f"cloudpickle {client['cloudpickle']} in the notebook, "
            f"cloudpickle {worker.get('cloudpickle')} on the worker"
        )
    if not problems:
        return ""
    return (
        "the worker cannot exchange values with this notebook: "
        + "; ".join(problems)
        + ". Use an image whose Python minor version and cloudpickle major version match the notebook's."
    )
