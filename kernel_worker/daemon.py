"""The worker daemon: sessions, the GPU queue, workers, idle release and the cost ledger.

One asyncio loop with two ROUTER sockets: ``front`` for notebooks, ``back`` for the
executors it started. It reads only headers; value frames are relayed as the
ZeroMQ frames they arrived in, never unpickled and never copied.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
import uuid
from typing import Any

import zmq
import zmq.utils.z85
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Bool, Dict, Float, Instance, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from kernel_worker import bulk, inventory, keys, scheduler
from kernel_worker import protocol as P
from kernel_worker.backends import Backend, WorkerSpec, backend_class
from kernel_worker.backends.base import SOCKET_NAME, VolumeError
from kernel_worker.executor import ENV_FLUSH_MS, ENV_HEARTBEAT_S, ENV_KEY, ENV_ORPHAN_S, ENV_SESSION
from kernel_worker.inventory import GPU
from kernel_worker.ledger import DEFAULT_PRICES, Ledger
from kernel_worker.session import Session, version_mismatch


def default_url() -> str:
    return "ipc://" + os.path.join(jupyter_runtime_dir(), "jupyter-gpu-daemon.sock")


def default_connection_file() -> str:
    return os.path.join(jupyter_runtime_dir(), "jupyter-gpu-daemon.json")


class WorkerDaemon(LoggingConfigurable):
    url = Unicode(
        help="Where notebooks connect: ipc://PATH or tcp://127.0.0.1:PORT. "
        "Default: an ipc socket in the Jupyter runtime directory."
    ).tag(config=True)
    connection_file = Unicode(help="File the daemon writes its url and key to (mode 0600) for clients.").tag(
        config=True
    )
    backend = Unicode("process", help="Where workers run: process (this host) or docker (a container each).").tag(
        config=True
    )
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
    max_sessions_per_user = Int(0, help="Most sessions one user may hold at once (0: no limit).").tag(config=True)
    max_gpus_per_user = Int(0, help="Most GPUs one user may hold at once (0: no limit).").tag(config=True)
    keep_warm = Dict(
        value_trait=Int(),
        help="Workers kept started ahead, per GPU model (e.g. {'H100': 1}); the next session asking for that "
        "model with the default image and no volumes starts warm. Their GPUs are held meanwhile; status shows "
        "what that idle time costs.",
    ).tag(config=True)
    pump_batch = Int(64, help="Messages handled per socket before other daemon tasks get a turn.").tag(config=True)
    flush_ms = Float(5.0, help="Milliseconds a worker batches stream output before sending it.").tag(config=True)
    prices = Dict(DEFAULT_PRICES, help="USD per device-hour by model name (H100, A100-80GB, ..., cpu).").tag(
        config=True
    )
    max_message_bytes = Int(16 * 1024**3, help="Largest request (all frames) a client may send.").tag(config=True)
    max_header_bytes = Int(4 * 1024**2, help="Largest request header (cell code included).").tag(config=True)
    bulk_root = Unicode(
        help="Directory (ideally tmpfs) where same-host clients and workers exchange large buffers."
    ).tag(config=True)
    state_dir = Unicode(
        help="Private directory for worker sockets, session records and logs; keep it across restarts so "
        "a restarted daemon can adopt its workers."
    ).tag(config=True)

    user = Unicode(
        help="Who the sessions of this daemon's connection file belong to; volumes are namespaced by it. "
        "Set by the operator, never by a client. Default: the OS user running the daemon."
    ).tag(config=True)

    backend_instance = Instance(Backend, allow_none=True)

    @default("user")
    def _user(self) -> str:
        return getpass.getuser()

    @default("url")
    def _url(self) -> str:
        return default_url()

    @default("connection_file")
    def _cf(self) -> str:
        return default_connection_file()

    @default("keys_dir")
    def _keys_dir(self) -> str:
        return keys.default_dir()

    @default("operators")
    def _operators(self) -> list:
        return [self.user]

    @default("state_dir")
    def _state(self) -> str:
        # Stable across restarts (so a restarted daemon finds its workers) and short
        # (ipc socket paths are limited to about 100 characters).
        tag = hashlib.sha1(os.path.abspath(self.connection_file).encode()).hexdigest()[:10]
        return os.path.join(tempfile.gettempdir(), f"jupyter-gpu-{os.getuid()}-{tag}")

    @default("bulk_root")
    def _bulk(self) -> str:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        return os.path.join(base, f"jupyter-gpu-{os.getuid()}")

    # ------------------------------------------------------------------ lifecycle

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        gpus = inventory.parse_simulated(self.simulate_gpus) if self.simulate_gpus else inventory.discover()
        self.scheduler = scheduler.Scheduler(gpus)
        self.key = self._load_or_make_key()
        self.signer = P.Signer(self.key)
        self.limits = P.Limits(self.max_header_bytes, P.Limits.max_frames, self.max_message_bytes)
        self.sessions: dict[str, Session] = {}  # by session id (the notebook's)
        self.warm: list[Session] = []
        self.owners: dict[str, str] = {}  # session id -> the user who made it, kept after release
        self._clients: dict[bytes, tuple[str, P.Signer]] = {}  # routing id -> (user, signer)
        self._key_signers: dict[str, P.Signer] = {}  # workers started ahead (keep_warm), not yet anyone's
        self.workers: dict[str, Session] = {}  # by worker id, for messages from workers
        self.ended: dict[str, str] = {}  # session id -> why its worker went away
        self.ledger = Ledger(self.prices, os.path.join(self.state_dir, "ledger.jsonl"))
        self._tasks: set[asyncio.Task] = set()
        self._stopping: asyncio.Event | None = None
        self._last_request = time.monotonic()
        self.daemon_id = hashlib.sha1(os.path.abspath(self.state_dir).encode()).hexdigest()[:12]
        if self.backend_instance is None:
            self.backend_instance = backend_class(self.backend)(parent=self, daemon_id=self.daemon_id)

    def _load_or_make_key(self) -> bytes:
        """The signing key, kept in the state directory so a restarted daemon keeps its
        clients (and they keep their sessions)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.state_dir, "daemon.key")
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
            if key:
                return key
        except FileNotFoundError:
            pass
        key = P.new_key()
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def _spawn(self, coro: Any, owner: set | None = None) -> asyncio.Task:
        """Start a task the daemon owns (and cancels at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        for s in (self._tasks, owner):
            if s is not None:
                s.add(task)
                task.add_done_callback(s.discard)
        return task

    async def run(self, ready: Any = None) -> None:
        """Serve until stopped (SIGTERM/SIGINT or ``stop()``). ``ready(info)`` is called once bound."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stopping.set)
            except (RuntimeError, ValueError):  # not the main thread
                pass
        self.ctx = zmq.Context()
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        os.makedirs(self.bulk_root, mode=0o700, exist_ok=True)
        self.bulk_probe = secrets.token_hex(16)
        with open(os.path.join(self.bulk_root, ".probe"), "w") as f:
            f.write(self.bulk_probe)
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.linger = 0
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.linger = 0
        self.back.router_mandatory = True  # a worker that is not connected is an error, not a silent drop
        _check_bindable(self.url, self.curve)
        self.zap = None
        if self.curve:
            self._setup_curve()
        if self.url.startswith("ipc://"):
            os.makedirs(os.path.dirname(self.url[6:]) or ".", exist_ok=True)
        self.front.bind(self.url)
        self.url = self.front.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._write_connection_file()
        self.log.info("jupyter-gpu daemon on %s (%s backend; %s)", self.url, self.backend, self.scheduler.describe())
        try:
            self._watch_sockets()
            await self._adopt_or_reap()
            self._spawn(self._fill_warm())
            self._spawn(self._reaper())
            if self.progress_interval > 0:
                self._spawn(self._progress())
            if ready is not None:
                ready({"url": self.url, "pid": os.getpid(), "connection_file": self.connection_file})
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _shutdown(self) -> None:
        for s in [*self.sessions.values(), *self.warm]:
            await self._release(s, "the daemon shut down", code=P.Err.SHUTDOWN)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock, _ in self._sockets:
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
            sock.close(0)
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
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.connection_file)

    # ------------------------------------------------------------------ sending

    def _to_client(self, ident: bytes, msg: P.Message) -> None:
        # ROUTER sends never block: unroutable peers are dropped by ZeroMQ.
        signer = self._clients.get(ident, (None, self.signer))[1]
        self.front.send_multipart([ident, *P.pack(msg, signer)], copy=False)
        self._schedule_pump()  # a send can swallow the FD's edge

    def _fail(self, ident: bytes, parent: P.Message | str | None, code: str, text: str, **extra: Any) -> None:
        if isinstance(parent, P.Message):
            msg = parent.reply(P.Msg.FAIL, {"code": code, "message": text, **extra})
        else:
            msg = P.Message(P.Msg.FAIL, {"code": code, "message": text, **extra}, parent=parent or "")
        self._to_client(ident, msg)

    def _to_worker(self, s: Session, msg: P.Message) -> None:
        try:
            self.back.send_multipart([s.wid.encode(), *P.pack(msg, s.signer)], copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the worker's connection is gone
            self._spawn(self._release(s, f"its worker is not connected ({e.strerror})", code=P.Err.WORKER_DIED))
        self._schedule_pump()

    # ------------------------------------------------------------------ front: notebooks

    def _setup_curve(self) -> None:
        """CurveZMQ on the front socket; our own ZAP handler (served by ``_pump``) admits
        only authorised keys, before any request from them is read."""
        public, secret = keys.load(self.keys_dir)
        self.authorized = keys.Authorized(self.keys_dir)
        self.zap = self.ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind("inproc://zeromq.zap.01")
        self.front.curve_server = True
        self.front.curve_secretkey = secret
        self.front.curve_publickey = public
        self.front.zap_domain = b"jupyter-gpu"

    def _on_zap(self, frames: list) -> None:
        """One ZAP request: version, id, domain, address, identity, mechanism, credentials."""
        version, request_id, _domain, address, _identity, mechanism = (f.bytes for f in frames[:6])
        public = zmq.utils.z85.encode(frames[6].bytes).decode() if mechanism == b"CURVE" and len(frames) > 6 else ""
        user = self.authorized.user(public) if public else None
        if user is None:
            self.log.warning(
                "refused a CURVE connection from %s: key %s is not authorised", address.decode(), public or "-"
            )
            self.zap.send_multipart([version, request_id, b"400", b"key not authorised", b"", b""])
        else:
            self.zap.send_multipart([version, request_id, b"200", b"OK", public.encode(), b""])
        self._schedule_pump()

    def _watch_sockets(self) -> None:
        """Serve both sockets from the event loop without a future per message.

        A ZeroMQ socket's FD only signals an edge, so ``_pump`` drains until both
        sockets are empty, and runs again after any send made outside it. Measured
        here: 0.25 ms per relayed round trip, against 0.37 ms awaiting
        ``zmq.asyncio`` receives.
        """
        self._loop = asyncio.get_running_loop()
        self._pump_scheduled = False
        self._sockets = [(self.front, self._on_front), (self.back, self._on_back)]
        if self.zap is not None:
            self._sockets.append((self.zap, self._on_zap))
        for sock, _ in self._sockets:
            self._loop.add_reader(sock.getsockopt(zmq.FD), self._pump)
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        for _ in range(self.pump_batch):
            moved = False
            for sock, handle in self._sockets:
                if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    handle(sock.recv_multipart(zmq.NOBLOCK, copy=False))
                    moved = True
            if not moved:
                return
        self._schedule_pump()  # more waiting: let other tasks run first, then go on

    def _identify(self, frame: Any) -> tuple[str, P.Signer] | None:
        """Who sent this, as the daemon established it: the user its CURVE key is authorised
        as, or the daemon's own user on ipc/loopback. None: a key no longer authorised."""
        if not self.curve:
            return self.user, self.signer
        public = frame.get("User-Id")  # set by our ZAP handler at the handshake: the client's key
        user = self.authorized.user(public)
        if user is None:
            return None
        # CurveZMQ authenticates and encrypts the connection; the HMAC (keyed by the client's
        # public key) only keeps the framing the same on every transport.
        signer = self._key_signers.get(public)
        if signer is None:
            signer = self._key_signers[public] = P.Signer(public.encode())
        return user, signer

    def _on_front(self, frames: list) -> None:
        self._last_request = time.monotonic()
        ident = frames[0].bytes
        who = self._identify(frames[0])
        if who is None:
            self.log.warning("dropped a request: its CURVE key was revoked")
            return
        user, signer = self._clients[ident] = who
        try:
            _, rest = P.split_routing(frames[1:])
            msg = P.unpack(rest, signer, self.limits, P.CLIENT_REQUESTS)
        except P.ProtocolError as e:
            self.log.warning("refused a request: %s", e.text)
            self._fail(ident, e.msg_id, e.code, e.text)
            return
        owner = self.owners.get(msg.session)
        if msg.type in SESSION_REQUESTS and owner is not None and owner != user:
            # Same answer as for a session that does not exist: nothing to learn from it.
            self._fail(ident, msg, P.Err.NO_SESSION, f"you have no session {msg.session}")
            return
        try:
            self._dispatch(ident, msg, user)
        except Exception as e:  # a bug must cost one reply, not the daemon
            self.log.exception("error handling %s", msg.type)
            self._fail(ident, msg, P.Err.BAD_MESSAGE, f"daemon could not handle {msg.type}: {e}")

    def _dispatch(self, ident: bytes, msg: P.Message, user: str) -> None:
        t = msg.type
        if t == P.Msg.PING:
            self._to_client(ident, msg.reply(P.Msg.PONG))
        elif t == P.Msg.HELLO:
            self._to_client(ident, msg.reply(P.Msg.WELCOME, self._welcome()))
        elif t == P.Msg.STATUS:
            everyone = bool(msg.content.get("all")) and user in self.operators
            self._to_client(ident, msg.reply(P.Msg.REPLY, self._status(user, everyone)))
        elif t == P.Msg.COST:
            self._to_client(
                ident, msg.reply(P.Msg.REPLY, self.ledger.summary(msg.session, self.sessions.get(msg.session)))
            )
        elif t == P.Msg.SPEND:
            since = msg.content.get("since", 0.0)
            everyone = bool(msg.content.get("all")) and user in self.operators
            live = list(self.sessions.values())
            spend = self.ledger.spend(None if everyone else user, float(since or 0.0), live)
            self._to_client(ident, msg.reply(P.Msg.REPLY, spend))
        elif t == P.Msg.RELEASE:
            self._spawn(self._handle_release(ident, msg))
        elif t == P.Msg.VOLUMES:
            self._spawn(self._handle_volumes(ident, msg, user))
        elif t == P.Msg.INTERRUPT:
            self._spawn(self._handle_interrupt(ident, msg))
        elif t in (P.Msg.EXECUTE, P.Msg.PULL):
            if not msg.session:
                self._fail(ident, msg, P.Err.BAD_MESSAGE, f"{t} needs a session id")
            elif (moved := msg.content.get("bulk")) is not None and not _valid_bulk(moved, len(msg.buffers)):
                self._fail(ident, msg, P.Err.BAD_MESSAGE, "bad bulk buffer references")
            else:
                self._handle_run(ident, msg, user)

    def _welcome(self) -> dict:
        return {
            "protocol": P.PROTOCOL_VERSION,
            "backend": self.backend,
            "pid": os.getpid(),
            "gpus": [g.to_json() for g in self.scheduler.gpus],
            "idle_timeout": self.idle_timeout,
            "bulk_root": self.bulk_root,
            "bulk_probe": self.bulk_probe,
        }

    def _status(self, user: str, everyone: bool) -> dict:
        """The host as ``user`` may see it: their own sessions (all, for operators); of a GPU
        someone else holds, who holds it but not their session id."""
        now = time.monotonic()
        gpus = []
        for g in self.scheduler.gpus:
            holder = self.scheduler.holder.get(g.uuid)
            warm = holder is not None and holder.startswith("warm-")
            s = self.sessions.get(holder or "")
            util, used = inventory.read(g, busy=s is not None and s.state == "busy")
            gpus.append(
                {
                    **g.to_json(),
                    "session": None if warm or (s and not everyone and s.user != user) else holder,
                    "user": s.user if s else None,
                    "warm": warm,
                    "util": util,
                    "memory_used_bytes": used,
                }
            )
        sessions = [
            {
                "id": s.id,
                "state": s.state,
                "device": s.device,
                "gpus": [g.uuid for g in s.gpus],
                "idle_s": now - s.last_active if s.state == "idle" else 0.0,
                "idle_timeout": self.idle_timeout,
                "held_s": now - s.started_at,
                "usd": self.ledger.usd(s, now - s.started_at),
                "cells": len(s.cells),
                "versions": s.versions,
                "user": s.user,
                "notebook": s.notebook,
            }
            for s in self.sessions.values()
            if everyone or s.user == user
        ]
        warm = [
            {
                "device": w.device,
                "gpus": [g.uuid for g in w.gpus],
                "state": w.state,
                "idle_s": now - w.started_at,
                "usd": self.ledger.usd(w, now - w.started_at),
            }
            for w in self.warm
        ]
        return {
            "gpus": gpus,
            "sessions": sessions,
            "warm": warm,
            "queue": self.scheduler.queue(),
            "backend": self.backend,
            "volumes": self.backend_instance.has_volumes,
        }

    async def _handle_volumes(self, ident: bytes, msg: P.Message, user: str) -> None:
        b = self.backend_instance
        op, name = msg.content.get("op"), str(msg.content.get("name") or "")
        ops = {
            "ls": lambda: b.list_volumes(user),
            "du": lambda: b.volume_usage(user),
            "create": lambda: b.create_volume(user, name),
            "rm": lambda: b.remove_volume(user, name),
        }
        if op not in ops:
            self._fail(
                ident, msg, P.Err.BAD_MESSAGE, f"unknown volumes operation {str(op)[:20]!r}; use ls, du, create, rm"
            )
            return
        try:
            result = await asyncio.to_thread(ops[op])  # the Docker SDK blocks
        except VolumeError as e:
            self._fail(ident, msg, P.Err.VOLUME, str(e))
            return
        self._to_client(ident, msg.reply(P.Msg.REPLY, {"result": result}))

    async def _handle_release(self, ident: bytes, msg: P.Message) -> None:
        s = self.sessions.get(msg.session)
        if s is not None:
            await self._release(s, "released by the user", code=P.Err.RELEASED)
        self._to_client(ident, msg.reply(P.Msg.REPLY, {"released": s is not None}))

    async def _handle_interrupt(self, ident: bytes, msg: P.Message) -> None:
        s = self.sessions.get(msg.session)
        done = False
        if s is not None and s.state == "busy" and s.handle is not None:
            await self.backend_instance.signal(s.handle, signal.SIGINT)
            done = True
        elif s is not None and s.state == "starting":
            for t in list(s.tasks):
                t.cancel()
            done = True
        self._to_client(ident, msg.reply(P.Msg.REPLY, {"interrupted": done}))

    def _handle_run(self, ident: bytes, msg: P.Message, user: str) -> None:
        """EXECUTE or PULL: hand it to the session's worker at once when there is one
        (the hot path, no task), else queue for GPUs and start a worker first."""
        s = self.sessions.get(msg.session)
        if s is not None and s.state == "adopting":
            self._spawn(self._begin_when_adopted(s, ident, msg, user))
            return
        if s is not None and s.state != "idle":
            self._fail(ident, msg, P.Err.BUSY, f"session {msg.session} is {s.state}: one request at a time")
            return
        if msg.type == P.Msg.PULL and s is None:
            why = self.ended.get(msg.session, "it has no worker")
            self._fail(ident, msg, P.Err.NO_SESSION, f"nothing to pull: {why}")
            return
        req = None
        if msg.type == P.Msg.EXECUTE and (s is None or msg.content.get("gpu")):
            try:
                req = scheduler.parse(str(msg.content.get("gpu") or scheduler.ANY))
                self.scheduler.check(req)
            except scheduler.SpecError as e:
                bad = "cannot provide" in str(e)
                self._fail(ident, msg, P.Err.NO_SUCH_GPU if bad else P.Err.BAD_SPEC, str(e))
                return
        if s is not None and (req is None or self.scheduler.satisfies(req, s.gpus)):
            self._begin(s, ident, msg)
            return
        assert req is not None
        over = self._over_limit(user, req, replacing=s)
        if over:
            self._fail(ident, msg, P.Err.UNAVAILABLE, over)
            return
        old, s = s, self._new_session(ident, msg, req, user)
        self.sessions[s.id] = s  # registered now: a second request finds it starting
        self._spawn(self._start_then_begin(old, s, ident, msg))

    def _begin(self, s: Session, ident: bytes, msg: P.Message) -> None:
        s.client = ident
        s.current = msg
        s.state = "busy"
        s.cell_started = time.monotonic()
        s.cell_done.clear()
        s.telemetry = inventory.Sample()
        s.notebook = str(msg.content.get("notebook") or s.notebook)
        if s.wid != s.id and msg.content.get("bulk"):
            self._move_bulk(msg.content["bulk"], s.id, s.wid)
        self._to_worker(s, msg)
        if msg.type == P.Msg.EXECUTE:
            if any(not g.simulated for g in s.gpus):
                self._spawn(self._sample(s), s.tasks)
            timeout = msg.content.get("timeout")
            if isinstance(timeout, (int, float)) and timeout > 0:
                self._spawn(self._enforce_timeout(s, msg, float(timeout)), s.tasks)

    async def _begin_when_adopted(self, s: Session, ident: bytes, msg: P.Message, user: str) -> None:
        """A request for a worker adopted after a restart that has not reconnected yet."""
        try:
            await asyncio.wait_for(asyncio.shield(s.ready), self.worker_start_timeout)
        except asyncio.TimeoutError:
            await self._release(s, "its worker did not reconnect after the daemon restarted", code=P.Err.WORKER_DIED)
            self._fail(
                ident,
                msg,
                P.Err.WORKER_DIED,
                f"session {s.id} ended: its worker did not reconnect after the daemon restarted",
            )
            return
        self._handle_run(ident, msg, user)

    # ------------------------------------------------------------------ warm pool

    async def _fill_warm(self) -> None:
        """Start workers ahead, as ``keep_warm`` asks, on GPUs nobody is using."""
        for model, want in self.keep_warm.items():
            req = scheduler.parse(model if model == inventory.CPU else f"{model}:1")
            while sum(w.request.text == req.text for w in self.warm) < want:
                wid = "warm-" + uuid.uuid4().hex[:16]
                gpus = self.scheduler.allocate_now(req, wid)
                if gpus is None:
                    break  # all busy: try again when one is released
                key = P.new_key()
                w = Session(wid, req, key, P.Signer(key), gpus=gpus, user=self.user)
                self.warm.append(w)
                try:
                    await self._start_worker(w)
                except Exception as e:  # noqa: BLE001 -- a failed pool start must not stop the daemon
                    self.log.warning("could not start a warm %s worker: %s", model, e)
                    await self._release(w, f"warm start failed: {e}")
                    break
                w.state = "warm"
                self._save_record(w)
                self.log.info("warm %s worker ready (%s)", model, wid)

    def _take_warm(self, s: Session, msg: P.Message) -> Session | None:
        """Hand a ready warm worker to ``s`` when one fits (default image, no volumes)."""
        if msg.content.get("image") or msg.content.get("volumes"):
            return None
        for w in self.warm:
            if w.state == "warm" and self.scheduler.satisfies(s.request, w.gpus):
                break
        else:
            return None
        self.warm.remove(w)
        w.releasing = True  # its watcher stands down; s gets its own below
        s.wid, s.key, s.signer, s.handle, s.gpus, s.versions = w.wid, w.key, w.signer, w.handle, w.gpus, w.versions
        s.ready, s.last_heard = w.ready, w.last_heard
        for g in s.gpus:
            self.scheduler.holder[g.uuid] = s.id
        self.workers[s.wid] = s
        s.watcher = self._spawn(self._watch(s))
        self._spawn(self._fill_warm())
        return w

    async def _free_warm_for(self, req: scheduler.Request) -> bool:
        """Give back warm workers' GPUs that ``req`` could use (it needs another image,
        volumes...). True when any were freed."""
        freed = [w for w in self.warm if w.gpus and self.scheduler.could_use(req, w.gpus)]
        for w in freed:
            await self._release(w, "its GPU was needed by a session that could not use it warm")
        return bool(freed)

    def _new_session(self, ident: bytes, msg: P.Message, req: scheduler.Request, user: str) -> Session:
        key = P.new_key()
        self.owners[msg.session] = user
        notebook = str(msg.content.get("notebook") or "")
        return Session(msg.session, req, key, P.Signer(key), client=ident, current=msg, user=user, notebook=notebook)

    def _over_limit(self, user: str, req: scheduler.Request, replacing: Session | None) -> str:
        """Why ``user`` may not start another session for ``req`` now ("" when they may)."""
        mine = [s for s in self.sessions.values() if s.user == user and s is not replacing]
        if self.max_sessions_per_user and len(mine) >= self.max_sessions_per_user:
            return (
                f"you already hold {len(mine)} session(s), the most this host allows per user "
                f"(max_sessions_per_user={self.max_sessions_per_user}): `%gpu release` one first"
            )
        want = min((n for _, n in req.alternatives), default=0)
        held = sum(len(s.gpus) for s in mine)
        if self.max_gpus_per_user and held + want > self.max_gpus_per_user:
            return (
                f"you hold {held} GPU(s); {req.text} would take you past this host's limit of "
                f"{self.max_gpus_per_user} per user (max_gpus_per_user): `%gpu release` first"
            )
        return ""

    async def _start_then_begin(self, old: Session | None, s: Session, ident: bytes, msg: P.Message) -> None:
        if old is not None:
            await self._release(old, f"moved from {old.request.text} to {s.request.text}")
        if await self._start_session(s, ident, msg):
            self._begin(s, ident, msg)

    async def _start_session(self, s: Session, ident: bytes, msg: P.Message) -> bool:
        req = s.request
        previous = self.ended.pop(s.id, None)
        t0 = time.monotonic()
        me = asyncio.current_task()
        s.tasks.add(me)  # so an interrupt can cancel the wait
        warm = None
        try:
            warm = self._take_warm(s, msg)
            if warm is None:
                s.gpus = self.scheduler.allocate_now(req, s.id) or []
                if s.gpus == [] and not self.scheduler.satisfies(req, []) and await self._free_warm_for(req):
                    s.gpus = self.scheduler.allocate_now(req, s.id) or []
            if warm is None and s.gpus == [] and not self.scheduler.satisfies(req, []):
                if msg.content.get("no_wait"):
                    holders = sorted(set(self.scheduler.holder.values()) - {s.id})
                    raise _Refused(
                        P.Err.UNAVAILABLE,
                        f"no {req.text} free right now (held by {len(holders)} other session(s)); "
                        "drop --no-wait to queue for it",
                    )

                def position(n: int) -> None:
                    self._to_client(ident, msg.reply(P.Msg.QUEUED, {"position": n, "request": req.text}))

                waiter = self._spawn(self.scheduler.acquire(req, s.id, position, None), s.tasks)
                s.gpus = await waiter
            waited = time.monotonic() - t0
            s.started_at = time.monotonic()
            if warm is None:
                await self._start_worker(s)
            self._save_record(s)
            mismatch = version_mismatch(msg.content.get("client_versions") or {}, s.versions)
            if mismatch:
                raise _Refused(P.Err.VERSION, mismatch)
            if s.watcher is not None and s.watcher.done():
                raise RuntimeError(f"the worker ended right after it started; see {self._log_path(s.wid)}")
        except _Refused as e:
            self._forget(s)
            await self._stop_worker(s)
            self._fail(ident, msg, e.code, e.text)
            return False
        except asyncio.CancelledError:
            self._forget(s)
            await self._stop_worker(s)
            self._fail(ident, msg, P.Err.RELEASED, "interrupted while waiting for a GPU or a worker; nothing ran")
            if self._stopping is not None and self._stopping.is_set():
                raise
            return False
        except Exception as e:
            self._forget(s)
            await self._stop_worker(s)
            self.log.warning("worker for %s failed to start: %s", s.id, e)
            code = P.Err.VOLUME if isinstance(e, VolumeError) else P.Err.WORKER_START
            self._fail(ident, msg, code, f"could not start a worker: {e}")
            return False
        finally:
            s.tasks.discard(me)
        s.state = "idle"
        info = {
            "gpus": [g.to_json() for g in s.gpus],
            "device": s.device,
            "waited_s": waited,
            "start_s": time.monotonic() - s.started_at,
            "cold": warm is None,
            "warm_for_s": time.monotonic() - warm.started_at if warm else 0.0,
            "previous": previous,
            "versions": s.versions,
            "idle_timeout": self.idle_timeout,
            "price_per_hour": self.ledger.price(s),
        }
        self._to_client(ident, msg.reply(P.Msg.STARTED, info))
        return True

    def _record_path(self, sid: str) -> str:
        return os.path.join(self._session_dir(sid), "session.json")

    def _save_record(self, s: Session) -> None:
        """What a restarted daemon needs to adopt this session's worker."""
        record = {
            "session": s.id,
            "key": s.key.decode(),
            "request": s.request.text,
            "gpus": [g.uuid for g in s.gpus],
            "user": s.user,
            "notebook": s.notebook,
            "held_since": time.time() - (time.monotonic() - s.started_at),
        }
        path = self._record_path(s.wid)
        fd = os.open(path + ".tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    async def _adopt_or_reap(self) -> None:
        """After a restart: adopt the workers we have records for, remove the rest."""
        found = dict(await self.backend_instance.find())
        sessions_dir = os.path.join(self.state_dir, "sessions")
        known = set(os.listdir(sessions_dir)) if os.path.isdir(sessions_dir) else set()
        for sid in sorted(known | set(found)):
            handle = found.get(sid)
            try:
                with open(self._record_path(sid)) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                record = None
            gpus = [g for g in self.scheduler.gpus if record and g.uuid in record.get("gpus", [])]
            free = all(g.uuid not in self.scheduler.holder for g in gpus)
            if handle is not None and record and self.backend_instance.is_running(handle) and free:
                self._adopt(record.get("session", sid), sid, record, handle, gpus)
                continue
            if handle is not None:
                self.log.info("removing leftover worker of session %s", sid)
                await self.backend_instance.stop(handle)
            shutil.rmtree(self._session_dir(sid), ignore_errors=True)
            shutil.rmtree(os.path.join(self.bulk_root, sid), ignore_errors=True)

    def _adopt(self, sid: str, wid: str, record: dict, handle: Any, gpus: list[GPU]) -> None:
        key = record["key"].encode()
        req = scheduler.parse(record["request"])
        s = Session(
            sid,
            req,
            key,
            P.Signer(key),
            gpus=gpus,
            handle=handle,
            state="adopting",
            user=record.get("user", ""),
            notebook=record.get("notebook", ""),
            wid=wid,
        )
        s.ready = asyncio.get_running_loop().create_future()
        s.ready.add_done_callback(lambda f: setattr(s, "state", "idle") if s.state == "adopting" else None)
        s.started_at = time.monotonic() - max(0.0, time.time() - float(record.get("held_since", time.time())))
        for g in gpus:
            self.scheduler.holder[g.uuid] = sid
        self.sessions[sid] = s
        self.workers[wid] = s
        self.owners[sid] = s.user
        if hasattr(handle, "log_path"):
            handle.log_path = self._log_path(wid)
        self._bind_worker(wid)  # the worker reconnects to its socket by itself
        self._spawn(self._watch(s))
        self.log.info("adopted the running worker of session %s (%s)", sid, s.device)

    def _session_dir(self, sid: str) -> str:
        """Private per-session directory: the worker's socket (mounted into its container,
        so a worker sees its own socket and nothing else) and its log."""
        return os.path.join(self.state_dir, "sessions", sid)

    async def _start_worker(self, s: Session) -> None:
        s.ready = asyncio.get_running_loop().create_future()
        bulk_dir = os.path.join(self.bulk_root, s.wid)
        sock_dir = self._session_dir(s.wid)
        for d in (bulk_dir, sock_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._bind_worker(s.wid)
        self.workers[s.wid] = s
        env = {
            ENV_SESSION: s.wid,
            ENV_KEY: s.key.decode(),
            ENV_FLUSH_MS: str(self.flush_ms),
            ENV_HEARTBEAT_S: str(self.worker_heartbeat_interval),
            ENV_ORPHAN_S: str(self.backend_instance.orphan_timeout),
        }
        options = {k: s.current.content.get(k) for k in ("image", "volumes")} if s.current else {}
        os.makedirs(os.path.join(self.state_dir, "logs"), exist_ok=True)
        log_path = self._log_path(s.wid)
        spec = WorkerSpec(s.wid, s.gpus, env, sock_dir, bulk_dir, log_path, s.user, options)
        s.handle = await self.backend_instance.start(spec)
        s.watcher = watcher = self._spawn(self._watch(s))
        done, _ = await asyncio.wait(
            {s.ready, watcher}, timeout=self.worker_start_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if s.ready not in done:
            raise RuntimeError(
                self._exit_reason(s, spec.log_path)
                if watcher in done
                else f"the worker did not connect within {self.worker_start_timeout:.0f} s; see {spec.log_path}"
            )
        s.versions = s.ready.result().get("versions", {})
        s.last_heard = time.monotonic()

    def _forget(self, s: Session) -> None:
        if self.sessions.get(s.id) is s:
            del self.sessions[s.id]
        if s in self.warm:
            self.warm.remove(s)
        s.releasing = True
        self.scheduler.release(s.gpus)
        s.gpus = []

    def _move_bulk(self, moved: dict, src: str, dst: str) -> None:
        """Bulk files travel between a session's and its (warm-started) worker's directory
        by rename: same tmpfs, no bytes copied, names already checked."""
        os.makedirs(os.path.join(self.bulk_root, dst), mode=0o700, exist_ok=True)
        for ref in moved.values():
            name = ref.get("file") if isinstance(ref, dict) else None
            if bulk.valid_name(name):
                try:
                    os.replace(os.path.join(self.bulk_root, src, name), os.path.join(self.bulk_root, dst, name))
                except FileNotFoundError:
                    pass  # the reader reports the missing buffer

    def _log_path(self, sid: str) -> str:
        return os.path.join(self.state_dir, "logs", f"{sid}.log")

    def _bind_worker(self, sid: str) -> None:
        path = os.path.join(self._session_dir(sid), SOCKET_NAME)
        self.back.bind(f"ipc://{path}")

    async def _stop_worker(self, s: Session) -> None:
        if s.handle is not None:
            await self.backend_instance.stop(s.handle)
        try:
            self.back.unbind(f"ipc://{os.path.join(self._session_dir(s.wid), SOCKET_NAME)}")
        except zmq.ZMQError:
            pass  # never bound: the start failed before
        if self.workers.get(s.wid) is s:
            del self.workers[s.wid]
        for d in {s.id, s.wid}:
            shutil.rmtree(os.path.join(self.bulk_root, d), ignore_errors=True)
        shutil.rmtree(self._session_dir(s.wid), ignore_errors=True)

    def _exit_reason(self, s: Session, log_path: str) -> str:
        """Why a worker ended before connecting, from the last lines it wrote."""
        try:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-4000:]
        except OSError:
            tail = ""
        missing = re.search(r"JUPYTER_GPU_MISSING: (.*)", tail)
        if missing:
            return missing.group(1)
        last = tail.strip().splitlines()[-1:] or ["(no output)"]
        return f"the worker exited before it connected: {last[0]} (log: {log_path})"

    async def _release(self, s: Session, why: str, code: str = P.Err.RELEASED) -> None:
        """Stop the worker and return its GPUs; a request in flight gets a FAIL saying why."""
        if s.releasing:
            return
        current = s.current if s.state == "busy" else None
        self.ledger.release(s)
        self._forget(s)
        for t in list(s.tasks):
            if t is not asyncio.current_task():
                t.cancel()
        self.ended[s.id] = why
        await self._stop_worker(s)
        if current is not None:
            self._fail(s.client, current, code, f"session {s.id} ended: {why}")
        self.log.info("session %s released: %s", s.id, why)
        if self.keep_warm and self._stopping is not None and not self._stopping.is_set():
            self._spawn(self._fill_warm())  # its GPUs may refill the pool

    async def _watch(self, s: Session) -> None:
        """End the session cleanly when its worker dies on its own."""
        exit = await self.backend_instance.wait(s.handle)
        if s.releasing or s.state == "starting":
            return  # a start in progress sees this task end and fails with the reason itself
        log = self._log_path(s.wid)
        why = f"its worker {exit.reason}"
        if s.state == "busy":
            why += " while running the cell"
        await self._release(
            s,
            f"{why}; variables defined on the worker are lost, the next cell starts a fresh one (worker log: {log})",
            code=P.Err.WORKER_DIED,
        )

    async def _enforce_timeout(self, s: Session, msg: P.Message, timeout: float) -> None:
        try:
            await asyncio.wait_for(s.cell_done.wait(), timeout)
            return
        except asyncio.TimeoutError:
            pass
        if s.current is not msg or s.state != "busy":
            return
        self._to_client(
            s.client,
            msg.reply(
                P.Msg.STREAM,
                {"name": "stderr", "text": f"\n[jupyter-gpu] cell passed --timeout {timeout:g} s: interrupting\n"},
            ),
        )
        await self.backend_instance.signal(s.handle, signal.SIGINT)
        try:
            await asyncio.wait_for(s.cell_done.wait(), self.interrupt_grace)
        except asyncio.TimeoutError:
            await self._release(
                s,
                f"the cell passed --timeout {timeout:g} s and did not stop within {self.interrupt_grace:g} s of an "
                "interrupt, so its worker was killed; variables defined on it are lost",
                code=P.Err.TIMEOUT,
            )

    async def _sample(self, s: Session) -> None:
        while s.state == "busy":
            inventory.sample(s.gpus, s.telemetry)
            try:
                await asyncio.wait_for(s.cell_done.wait(), self.telemetry_interval)
            except asyncio.TimeoutError:
                continue

    async def _progress(self) -> None:
        """Tell each running cell's notebook how it is going (its live status line)."""
        while True:
            await asyncio.sleep(self.progress_interval)  # a periodic timer, not a synchronisation
            now = time.monotonic()
            for s in list(self.sessions.values()):
                msg = s.current
                if s.state != "busy" or msg is None or msg.type != P.Msg.EXECUTE:
                    continue
                elapsed = now - s.cell_started
                if elapsed < self.progress_interval:
                    continue
                t = s.telemetry
                simulated = any(g.simulated for g in s.gpus)
                util = (100.0 if s.gpus else None) if simulated else t.last_util
                progress = {
                    "elapsed_s": elapsed,
                    "usd": self.ledger.usd(s, elapsed),
                    "device": s.device,
                    "count": len(s.gpus),
                    "simulated": simulated,
                    "util": util,
                    "memory_used_bytes": t.last_memory_bytes,
                    "memory_bytes": sum(g.memory_bytes for g in s.gpus),
                }
                self._to_client(s.client, msg.reply(P.Msg.PROGRESS, progress))

    # ------------------------------------------------------------------ back: executors

    def _on_back(self, frames: list) -> None:
        sid = frames[0].bytes.decode("utf-8", "replace")
        s = self.workers.get(sid)
        if s is None:
            return  # a worker we already let go of
        try:
            _, rest = P.split_routing(frames[1:])
            msg = P.unpack(rest, s.signer, self.limits, P.EXECUTOR_REPLIES)
        except P.ProtocolError as e:
            self.log.warning("dropped a bad message from worker %s: %s", sid, e.text)
            return
        s.last_heard = time.monotonic()
        self._from_worker(s, msg)

    def _from_worker(self, s: Session, msg: P.Message) -> None:
        t = msg.type
        if t == P.Msg.READY:
            if s.ready is not None and not s.ready.done():
                s.ready.set_result(msg.content)
            return
        if t in (P.Msg.HEARTBEAT, P.Msg.PONG):
            return
        if s.current is None or msg.parent != s.current.id:
            return  # output of a request that was already answered
        msg.session = s.id
        if s.wid != s.id and msg.content.get("bulk"):
            self._move_bulk(msg.content["bulk"], s.wid, s.id)
        if t == P.Msg.DONE:
            msg.content["cost"] = self.ledger.cell(s)
        if t in (P.Msg.DONE, P.Msg.VALUES):
            s.state = "idle"
            s.current = None
            s.last_active = time.monotonic()
            s.cell_done.set()
        self._to_client(s.client, msg)

    # ------------------------------------------------------------------ housekeeping

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)  # a periodic timer, not a synchronisation
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.state == "idle" and now - s.last_active > self.idle_timeout:
                    self._spawn(self._release(s, f"it was idle for more than {self.idle_timeout:g} s (idle_timeout)"))
                elif s.state != "starting" and now - s.last_heard > self.worker_heartbeat_timeout:
                    self._spawn(
                        self._release(
                            s,
                            f"its worker sent no heartbeat for {self.worker_heartbeat_timeout:g} s and was stopped",
                            code=P.Err.WORKER_DIED,
                        )
                    )
            quiet = now - self._last_request
            if self.exit_when_idle and not self.sessions and quiet > self.exit_when_idle:
                self.log.info("no sessions and no requests for %.0f s: exiting", quiet)
                self.stop()


class _Refused(Exception):
    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text


SESSION_REQUESTS = frozenset({P.Msg.EXECUTE, P.Msg.PULL, P.Msg.INTERRUPT, P.Msg.RELEASE, P.Msg.COST})


def _check_bindable(url: str, curve: bool = False) -> None:
    """Only ipc and loopback tcp: anything reachable from other machines needs CurveZMQ
    encryption and per-user keys, which this daemon does not offer yet."""
    m = re.match(r"^tcp://([^:]+):(\d+|\*)$", url)
    if url.startswith("ipc://") or (m and (curve or m.group(1) in ("127.0.0.1", "localhost", "[::1]"))):
        return
    raise ValueError(
        f"refusing to listen on {url}: only ipc:// and tcp://127.0.0.1 are allowed without CurveZMQ; "
        "use --WorkerDaemon.curve=True (after `jupyter gpu keys init`), or an SSH tunnel to a loopback port"
    )


def _valid_bulk(moved: Any, nframes: int) -> bool:
    if not isinstance(moved, dict):
        return False
    for k, ref in moved.items():
        if not (k.isdigit() and int(k) < nframes and isinstance(ref, dict)):
            return False
        if not bulk.valid_name(ref.get("file")) or not isinstance(ref.get("size"), int):
            return False
    return True
