"""The worker daemon: its configuration, and the parts it is built from.

One asyncio loop serves two ROUTER sockets: ``front`` for notebooks, ``workers`` for
the executors it started. It reads only headers; value frames are relayed as the
ZeroMQ frames they arrived in, never unpickled and never copied. Each job has a module:

    front.py      the client socket, CURVE/ZAP, unpacking, ownership, the dispatch table
    workers.py    the executors' socket and a worker's life (directories, start, stop)
    sessions.py   a session's life: request, start, cells, release
    placement.py  per-user limits, free GPUs, the FIFO queue (or the backend's own)
    reaper.py     idle release, silent or dead workers, --timeout, exit when idle
    records.py    session records on disk; adopting workers after a restart
    attach.py     who follows a session's output: reconnects, keepalives, ATTACH
    packages.py   `%gpu pip install` into a user's package directory
    pool.py       the warm pool (keep_warm)
    services.py   hello, status, cost, spend, volumes
    telemetry.py  GPU sampling and progress messages while a cell runs
    workdirs.py   the notebook's directory synced to a per-user workspace: SYNC, FETCH, a cell's cwd
    mirror.py     the workspace and packages of a worker that cannot see this host's files, over its socket
    streams.py    large values as CHUNK messages: on to the worker at once, or held for their request
    zap.py        the one ZAP handler: who may connect to each CURVE socket
    pump.py       serving the sockets from the event loop
    paths.py      where the daemon keeps things

The parts reach each other through the daemon (``self.d``); only this module wires them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import secrets
import signal
import time
import uuid
from typing import Any, Coroutine

import zmq
from traitlets import Bool, Dict, Float, Instance, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from kernel_worker import inventory, keys, scheduler
from kernel_worker import protocol as P
from kernel_worker.backends import Backend, backend_class
from kernel_worker.daemon import paths
from kernel_worker.daemon.accounting import Accounting
from kernel_worker.daemon.attach import Attach
from kernel_worker.daemon.budgets import Budgets
from kernel_worker.daemon.errors import StartRefused
from kernel_worker.daemon.front import Front
from kernel_worker.daemon.mirror import Mirrors
from kernel_worker.daemon.packages import Packages
from kernel_worker.daemon.placement import Placement
from kernel_worker.daemon.pool import WarmPool
from kernel_worker.daemon.pump import Pump
from kernel_worker.daemon.reaper import Reaper
from kernel_worker.daemon.records import Records
from kernel_worker.daemon.services import Services
from kernel_worker.daemon.sessions import Sessions
from kernel_worker.daemon.snapshots import Snapshots
from kernel_worker.daemon.streams import Streams
from kernel_worker.daemon.telemetry import Telemetry
from kernel_worker.daemon.workdirs import Workdirs
from kernel_worker.daemon.workers import Workers
from kernel_worker.daemon.zap import Zap
from kernel_worker.ledger import Ledger


class WorkerDaemon(LoggingConfigurable):
    """Every tunable of the daemon (``c.WorkerDaemon.*``), and the parts built from them."""

    url = Unicode(
        help="Where notebooks connect: ipc://PATH or tcp://127.0.0.1:PORT. "
        "Default: an ipc socket in the Jupyter runtime directory."
    ).tag(config=True)
    connection_file = Unicode(help="File the daemon writes its url and key to (mode 0600) for clients.").tag(
        config=True
    )
    backend = Unicode(
        "process",
        help="Where workers run: process (this host), docker (a container each) or slurm (a Slurm job each, "
        "placed by Slurm; the daemon is a gateway on the login node, see c.SlurmBackend).",
    ).tag(config=True)
    simulate_gpus = Unicode(
        "", help='Declared GPU inventory for machines without GPUs, e.g. "H100:2,A100-80GB:1". Empty: ask pynvml.'
    ).tag(config=True)
    idle_timeout = Float(300.0, help="Seconds a session may sit idle before its worker and GPUs are released.").tag(
        config=True
    )
    exit_when_idle = Float(
        0.0,
        help="Exit after this many seconds with no sessions and no requests (0: never). The embedded daemon sets it.",
    ).tag(config=True)
    worker_start_timeout = Float(60.0, help="Seconds a new worker has to connect back before its start fails.").tag(
        config=True
    )
    interrupt_grace = Float(
        5.0, help="Seconds a cell past its --timeout gets after SIGINT before its worker is killed."
    ).tag(config=True)
    interrupt_repeat = Float(
        1.0,
        help="Seconds between SIGINTs to a cell being stopped (--timeout, a budget): one that lands before the "
        "worker runs the cell's code is ignored, so it is sent again.",
    ).tag(config=True)
    worker_heartbeat_timeout = Float(
        30.0, help="A worker silent this long (no heartbeat, no output) is considered hung and stopped."
    ).tag(config=True)
    worker_heartbeat_interval = Float(2.0, help="Seconds between a worker's heartbeats.").tag(config=True)
    reap_interval = Float(1.0, help="Seconds between checks for idle sessions and silent workers.").tag(config=True)
    telemetry_interval = Float(0.5, help="Seconds between GPU utilisation/memory samples while a cell runs.").tag(
        config=True
    )
    progress_interval = Float(
        1.0, help="Seconds between progress messages (elapsed, dollars so far, GPU readings) to a running cell."
    ).tag(config=True)
    curve = Bool(
        False,
        help="Encrypt and authenticate clients with CurveZMQ (server key and authorized_keys in keys_dir); "
        "required to listen anywhere but ipc or loopback.",
    ).tag(config=True)
    keys_dir = Unicode(
        help="CurveZMQ keys: server key pair and authorized_keys. Default: <jupyter config>/jupyter_gpu"
    ).tag(config=True)
    operators = List(
        Unicode(),
        help="Users who may see everyone's sessions (`jupyter gpu status --all`). Default: the daemon's user.",
    ).tag(config=True)
    max_sessions_per_user = Int(
        8, help="Most sessions (notebooks with a worker, starting or queued) one user may hold at once (0: no limit)."
    ).tag(config=True)
    max_gpus_per_user = Int(8, help="Most GPUs one user may hold at once (0: no limit).").tag(config=True)
    max_queued_per_user = Int(
        4, help="Most requests one user may have waiting in the GPU queue at once (0: no limit)."
    ).tag(config=True)
    peer_queue = Int(
        32,
        help="Requests the daemon takes from one connection before it reads the next (ZeroMQ's receive high-water "
        "mark per peer): a flooding client waits on its own side, in its own memory.",
    ).tag(config=True)
    keep_warm = Dict(
        value_trait=Int(),
        help="Workers kept started ahead, per GPU model (e.g. {'H100': 1}); the next session asking for that "
        "model with the default image and no volumes starts warm. Their GPUs are held meanwhile; status shows "
        "what that idle time costs.",
    ).tag(config=True)
    pump_batch = Int(64, help="Messages handled per socket before other daemon tasks get a turn.").tag(config=True)
    flush_ms = Float(5.0, help="Milliseconds a worker batches stream output before sending it.").tag(config=True)
    max_message_bytes = Int(
        4 * 1024**3,
        help="Largest request (all frames) a client may send. ZeroMQ cuts off a connection whose single frame is "
        "larger still (by 64 MiB) before buffering it; the rest get a too_large reply. A value shipped with a cell "
        "travels in one frame unless notebook and worker share a host.",
    ).tag(config=True)
    max_header_bytes = Int(4 * 1024**2, help="Largest request header (cell code included).").tag(config=True)
    bulk_root = Unicode(
        help="Directory (ideally tmpfs) where same-host clients and workers exchange large buffers."
    ).tag(config=True)
    state_dir = Unicode(
        help="Private directory for worker sockets, session records and logs; keep it across restarts so "
        "a restarted daemon can adopt its workers."
    ).tag(config=True)

    client_timeout = Float(
        30.0,
        help="A notebook kernel whose keepalive pings stop for this long is gone: its session is detached "
        "(a running cell keeps running; `%gpu attach` in another kernel takes it over).",
    ).tag(config=True)
    orphan_grace = Float(
        120.0,
        help="Seconds a detached session with no cell running is kept for `%gpu attach` before it is released "
        "(its GPUs are held meanwhile). Raise it where people come back to a long job the next morning.",
    ).tag(config=True)
    output_memory_bytes = Int(
        8 * 1024**2,
        help="A session's current cell output kept in memory for reconnects and `%gpu attach`; more goes to disk.",
    ).tag(config=True)
    output_disk_bytes = Int(
        256 * 1024**2,
        help="At most this much of a cell's output is kept on disk per session; past it the middle is left out.",
    ).tag(config=True)

    pip_timeout = Float(600.0, help="Seconds one `%gpu pip install` may run before it is stopped.").tag(config=True)

    single_tenant = Bool(
        False,
        help="Let several CurveZMQ users share the process backend. It gives away all isolation between them: "
        "every user's cells run as this daemon's OS user, so any of them can read the daemon's keys, records and "
        "authorized_keys, authorise themselves as anyone, and run code in anyone's session. Only for a box whose "
        "key holders all trust each other; otherwise use the docker backend.",
    ).tag(config=True)
    user = Unicode(
        help="Who the sessions of this daemon's connection file belong to; volumes are namespaced by it. "
        "Set by the operator, never by a client. Default: the OS user running the daemon."
    ).tag(config=True)

    workspace_timeout = Float(
        300.0,
        help="Seconds one workspace sync or fetch may spend on the daemon's disk (in a thread) before it is "
        "refused; the limits on what is synced are c.Workspaces.* (quota_bytes per user, max_files, "
        "max_fetch_bytes, root).",
    ).tag(config=True)

    backend_instance = Instance(Backend, allow_none=True)

    @default("user")
    def _user(self) -> str:
        return pwd.getpwuid(os.geteuid()).pw_name  # not $USER, which sudo -E or su -m leave naming another

    @default("url")
    def _url(self) -> str:
        return paths.default_url()

    @default("connection_file")
    def _cf(self) -> str:
        return paths.default_connection_file()

    @default("keys_dir")
    def _keys_dir(self) -> str:
        return keys.default_dir()

    @default("operators")
    def _operators(self) -> list:
        return [self.user]

    @default("state_dir")
    def _state(self) -> str:
        return paths.default_state_dir(self.connection_file)

    @default("bulk_root")
    def _bulk(self) -> str:
        return paths.default_bulk_root()

    # ------------------------------------------------------------------ wiring

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        if self.curve and self.backend == "process" and not self.single_tenant:
            raise StartRefused(
                "refusing to serve CurveZMQ users on the process backend: every user's cells would run as this "
                "daemon's OS user and could read its keys and take over each other's sessions. Use "
                "--backend docker, or --WorkerDaemon.single_tenant=True if every key holder may act as every other"
            )
        self.key = paths.load_or_make_key(self.state_dir)
        self.signer = P.Signer(self.key)
        self.limits = P.Limits(self.max_header_bytes, P.Limits.max_frames, self.max_message_bytes)
        self.ledger = Ledger(state_dir=self.state_dir, parent=self, log=self.log)
        self.budgets = Budgets(self)
        # Every answer to a ping names it: a notebook sees at once that it talks to a new daemon.
        self.incarnation = f"{uuid.uuid4().hex[:12]}@{time.time():.0f}"
        self.daemon_id = hashlib.sha1(os.path.abspath(self.state_dir).encode()).hexdigest()[:12]
        if self.backend_instance is None:
            self.backend_instance = backend_class(self.backend)(
                parent=self, daemon_id=self.daemon_id, state_dir=self.state_dir
            )
        backend = self.backend_instance
        gpus = backend.inventory()
        if gpus is None:
            gpus = inventory.parse_simulated(self.simulate_gpus) if self.simulate_gpus else inventory.discover()
        self.scheduler = scheduler.Scheduler(gpus, holds=not backend.schedules)
        self._tasks: set[asyncio.Task] = set()
        self._stopping: asyncio.Event | None = None
        self.pump = Pump(self.pump_batch, self.log)
        self.zap = Zap(self)
        self.front = Front(self)
        self.workers = Workers(self)
        self.sessions = Sessions(self)
        self.placement = Placement(self)
        self.records = Records(self)
        self.attach = Attach(self)
        self.packages = Packages(self)
        self.backend_instance.packages_for = self.packages.dir_for
        self.pool = WarmPool(self)
        self.reaper = Reaper(self)
        self.services = Services(self)
        self.telemetry = Telemetry(self)
        self.accounting = Accounting(self)
        self.snapshots = Snapshots(self)
        self.workdirs = Workdirs(self)
        self.streams = Streams(self)
        self.mirrors = Mirrors(self)
        self.backend_instance.workspace_for = self.workdirs.mount_for
        sv, ss, wd = self.services, self.sessions, self.workdirs
        self.front.route(
            {
                P.Msg.PING: self.attach.ping,
                P.Msg.ATTACH: self.attach.attach,
                P.Msg.PIP: self.packages.install,
                P.Msg.HELLO: sv.hello,
                P.Msg.STATUS: sv.status,
                P.Msg.COST: sv.cost,
                P.Msg.SPEND: sv.spend,
                P.Msg.VOLUMES: sv.volumes,
                P.Msg.EXECUTE: wd.wrap_execute(ss.handle_run),
                P.Msg.PULL: ss.handle_run,
                P.Msg.INTERRUPT: ss.handle_interrupt,
                P.Msg.INPUT_REPLY: ss.handle_input_reply,
                P.Msg.RELEASE: ss.handle_release,
                P.Msg.SYNC: wd.sync,
                P.Msg.FETCH: wd.fetch,
                P.Msg.SNAPSHOT: self.snapshots.handle,
                P.Msg.CHUNK: self.streams.chunk,
            }
        )

    def spawn(self, coro: Coroutine, owner: set | None = None) -> asyncio.Task:
        """Start a task the daemon owns (and cancels at shutdown); ``owner`` also tracks it
        (a session's tasks, cancelled when it is released)."""
        task = asyncio.get_running_loop().create_task(coro)
        for s in (self._tasks, owner):
            if s is not None:
                s.add(task)
                task.add_done_callback(s.discard)
        return task

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()

    async def run(self, ready: Any = None) -> None:
        """Serve until stopped (SIGTERM/SIGINT or ``stop()``). ``ready(info)`` is called once bound."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stopping.set)
            except (RuntimeError, ValueError):  # not the main thread
                pass
        for d in (self.state_dir, self.bulk_root, *self.workers.roots(), self.records.root):
            paths.private_dir(d)
        self.bulk_probe = secrets.token_hex(16)
        probe = paths.open_private(os.path.join(self.bulk_root, ".probe"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(probe, "w") as f:
            f.write(self.bulk_probe)
        self.ctx = zmq.Context()
        self.workers.open(self.ctx)
        try:
            # Workers first: a notebook asking after its running cell must find it adopted.
            await self.records.adopt_or_reap()
            await asyncio.to_thread(self.snapshots.sweep)  # before any snapshot can be under way
            self.url = self.front.open(self.ctx)
            self._write_connection_file()
            self.log.info(
                "jupyter-gpu daemon on %s (%s backend; %s)", self.url, self.backend, self.scheduler.describe()
            )
            self.pump.start()
            self.spawn(self.pool.fill())
            self.spawn(self.reaper.run())
            if self.progress_interval > 0:
                self.spawn(self.telemetry.progress())
            if ready is not None:
                ready({"url": self.url, "pid": os.getpid(), "connection_file": self.connection_file})
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _shutdown(self) -> None:
        leaving = [*self.sessions.live.values(), *self.pool.warm]  # at once: each may write a snapshot
        await asyncio.gather(
            *(
                self.sessions.release(s, "the daemon shut down", code=P.Err.SHUTDOWN, keep=s not in self.pool.warm)
                for s in leaving
            ),
            return_exceptions=True,
        )
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ledger.close()
        self.pump.close()
        self.ctx.term()
        try:
            with open(self.connection_file) as f:
                if json.load(f).get("pid") == os.getpid():
                    os.unlink(self.connection_file)
        except (OSError, ValueError):
            pass
        if self.url.startswith("ipc://"):
            try:
                os.unlink(self.url[6:])
            except OSError:
                pass

    def _write_connection_file(self) -> None:
        info = {"url": self.url, "key": self.key.decode(), "pid": os.getpid(), "backend": self.backend}
        os.makedirs(os.path.dirname(self.connection_file) or ".", exist_ok=True)
        tmp = self.connection_file + f".{os.getpid()}.tmp"
        with os.fdopen(paths.open_private(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC), "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.connection_file)
