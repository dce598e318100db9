"""The executors' side of the daemon: one ROUTER socket that every worker dials back to
(through an ipc socket in its own session directory; or, for a backend whose workers run
on other nodes, one CURVE tcp address, each session's worker with a key pair of its own),
and a worker's life: its directories, start (until it says READY), the messages it sends,
stop.

A worker's id (``wid``) names its socket, log, bulk directory and container: the session
id, or a warm worker's own id until a session takes it over.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq
import zmq.utils.z85

from kernel_worker import bulk, filestream
from kernel_worker import protocol as P
from kernel_worker.backends import WorkerSpec
from kernel_worker.backends.base import SOCKET_NAME
from kernel_worker.daemon import paths
from kernel_worker.daemon.errors import StartRefused, UnsafePath
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

WORKER_ZAP_DOMAIN = b"jupyter-gpu-workers"
DIAL_BACK_FILE = "dial-back.json"  # the tcp address workers dial: the same after a restart


def curve_pair(key: bytes, purpose: bytes) -> tuple[bytes, bytes]:
    """A CURVE key pair (z85 public, secret) derived from a secret ``key``: a restarted
    daemon knows its worker socket's keys, and each adopted worker's, from what it kept."""
    secret = zmq.utils.z85.encode(hmac.new(key, purpose, hashlib.sha256).digest())
    return zmq.curve_public(secret), secret


class Workers:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.by_wid: dict[str, Session] = {}  # for messages from workers
        self.sock: zmq.Socket | None = None
        # the daemon's own requests: id -> (wid, answer, where the files sent ahead of it go)
        self.asked: dict[str, tuple[str, asyncio.Future, filestream.Receiver | None]] = {}
        self.dial_back = ""  # the tcp address workers on other nodes dial ("": ipc, per worker)
        self.dial_public = b""  # the worker socket's CURVE public key, which they are told
        self.keys: dict[str, str] = {}  # a dialling worker's CURVE public key -> its wid

    def open(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.router_mandatory = True  # a worker that is not connected is an error, not a silent drop
        self.sock.sndhwm = 0  # a value's chunks are in memory already: queue them all, never refuse one
        if self.d.backend_instance.dials_back:
            self._open_tcp(ctx)
        self.d.pump.add(self.sock, self._on_message)

    def _open_tcp(self, ctx: zmq.Context) -> None:
        """One CURVE tcp address for every worker, where its own key admits it as itself.
        The port is kept in the state directory: workers that outlive the daemon dial the
        same address again, and a restarted daemon must be there."""
        public, secret = curve_pair(self.d.key, b"worker-socket")
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.dial_public = public
        self.d.zap.serve(ctx, self.sock, WORKER_ZAP_DOMAIN, self.keys.get)
        kept = os.path.join(self.d.state_dir, DIAL_BACK_FILE)
        try:
            with open(kept) as f:
                url = str(json.load(f)["url"])
        except (OSError, ValueError, KeyError, TypeError):
            url = self.d.backend_instance.dial_back_url()
        try:
            self.sock.bind(url)
        except zmq.ZMQError as e:
            raise StartRefused(
                f"cannot listen for workers on {url} ({e.strerror}); the workers of an earlier run dial that "
                f"address: free it, or remove {kept} if no worker of this daemon still runs"
            ) from None
        self.dial_back = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        with os.fdopen(paths.open_private(kept, os.O_CREAT | os.O_WRONLY | os.O_TRUNC), "w") as f:
            json.dump({"url": self.dial_back}, f)

    # ------------------------------------------------------------------ where a worker lives

    @property
    def sessions_root(self) -> str:
        return os.path.join(self.d.state_dir, "sessions")

    @property
    def logs_root(self) -> str:
        return os.path.join(self.d.state_dir, "logs")

    def roots(self) -> tuple[str, ...]:
        """The private directories every worker's own one lives in."""
        return self.sessions_root, self.logs_root

    def session_dir(self, wid: str) -> str:
        """Private per-worker directory holding its socket and nothing else (it is mounted
        into the worker's container, so a worker sees its own socket only)."""
        return paths.child(self.sessions_root, wid)

    def bulk_dir(self, wid: str) -> str:
        return paths.child(self.d.bulk_root, wid)

    def log_path(self, wid: str) -> str:
        return paths.child(self.logs_root, f"{wid}.log")

    def endpoint(self, wid: str) -> str:
        return self.dial_back or f"ipc://{os.path.join(self.session_dir(wid), SOCKET_NAME)}"

    def bind(self, s: Session) -> None:
        """Let ``s``'s worker in: its own ipc socket, or its key at the tcp address."""
        if self.dial_back:
            self.keys[curve_pair(s.key, b"worker")[0].decode()] = s.wid
        else:
            self.sock.bind(self.endpoint(s.wid))

    def dial_env(self, s: Session) -> dict[str, str]:
        """What a worker that dials back over tcp needs to know: where, and its keys."""
        if not self.dial_back:
            return {}
        return {
            P.Env.ENDPOINT: self.dial_back,
            P.Env.CURVE_SERVER: self.dial_public.decode(),
            P.Env.CURVE_SECRET: curve_pair(s.key, b"worker")[1].decode(),
        }

    def remove_dirs(self, wid: str, session: str = "", keep_bulk: bool = False) -> None:
        """A worker's directories, and the bulk files of the session it served (kept when the
        session goes on with another worker: the notebook's next values are already there)."""
        try:
            bulk_dirs = {self.bulk_dir(wid), self.bulk_dir(session or wid)}
            dirs = {self.session_dir(wid)} | (bulk_dirs - {self.bulk_dir(session)} if keep_bulk else bulk_dirs)
        except UnsafePath as e:  # only names the daemon checked get here: a bug, never a reason to rmtree
            self.log.error("not removing the directories of worker %r: %s", wid, e)
            return
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ life

    async def start(self, s: Session, on_wait: Callable[[str], None] | None = None) -> None:
        """Start ``s``'s worker and wait until it says READY (or fails, or times out); a
        backend with a scheduler of its own (Slurm) tells ``on_wait`` where it waits first,
        for as long as that scheduler takes."""
        s.ready = asyncio.get_running_loop().create_future()
        for d in (self.bulk_dir(s.wid), self.session_dir(s.wid)):
            paths.private_dir(d)
        self.bind(s)
        self.by_wid[s.wid] = s
        env = {
            P.Env.SESSION: s.wid,
            P.Env.KEY: s.key.decode(),
            P.Env.FLUSH_MS: str(self.d.flush_ms),
            P.Env.HEARTBEAT_S: str(self.d.worker_heartbeat_interval),
            P.Env.ORPHAN_S: str(self.d.backend_instance.orphan_timeout),
            **self.dial_env(s),
        }
        options = {k: s.current.content.get(k) for k in ("image", "volumes")} if s.current else {}
        spec = WorkerSpec(
            s.wid, s.gpus, env, self.session_dir(s.wid), self.bulk_dir(s.wid), self.log_path(s.wid), s.user, options
        )
        s.handle = await self._started(spec)
        if s.releasing:  # released while the backend was starting it: stop() found nothing to stop
            await self.d.backend_instance.stop(s.handle)
            raise RuntimeError(f"session {s.id} was released while its worker started")
        await self.d.backend_instance.placed(s.handle, on_wait or (lambda text: None))
        if s.queued:  # it waited in the backend's queue: it holds GPUs, and is billed, from now
            s.queued, s.started_at = False, time.monotonic()
        s.watcher = watcher = self.d.spawn(self.d.reaper.watch(s))
        done, _ = await asyncio.wait(
            {s.ready, watcher}, timeout=self.d.worker_start_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if s.ready not in done:
            raise RuntimeError(
                self.exit_reason(spec.log_path)
                if watcher in done
                else f"the worker did not connect within {self.d.worker_start_timeout:.0f} s; see {spec.log_path}"
            )
        s.versions = s.ready.result().get("versions", {})
        s.last_heard = time.monotonic()

    async def _started(self, spec: WorkerSpec) -> Any:
        """The backend's start, which goes on if we are cancelled (a container being created
        in a thread, say): then its worker is stopped once made, never left running unseen."""
        backend = self.d.backend_instance
        start = asyncio.ensure_future(backend.start(spec))
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            try:
                handle = await asyncio.wait_for(start, self.d.worker_start_timeout)
            except Exception:  # it failed, or never finished: nothing of ours runs
                self.log.info("a cancelled start of worker %s made nothing", spec.session)
            else:
                await backend.stop(handle)
            raise

    async def stop(self, s: Session) -> None:
        """Stop ``s``'s worker for good and remove what it had on this host."""
        if s.handle is not None:
            await self.d.backend_instance.stop(s.handle)
        if self.dial_back:  # this worker's key only: a new worker of the same id may be in already
            self.keys.pop(curve_pair(s.key, b"worker")[0].decode(), None)
        else:
            try:
                self.sock.unbind(self.endpoint(s.wid))
            except zmq.ZMQError:
                pass  # never bound: the start failed before
        if self.by_wid.get(s.wid) is s:
            del self.by_wid[s.wid]
        self.d.records.remove(s.wid)
        self.remove_dirs(s.wid, s.id, keep_bulk=s.moving)

    def exit_reason(self, log_path: str) -> str:
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

    # ------------------------------------------------------------------ messages

    def send(self, s: Session, msg: P.Message) -> None:
        try:
            self.sock.send_multipart([s.wid.encode(), *P.pack(msg, s.signer)], copy=False)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the worker's connection is gone
            why = f"its worker is not connected ({e.strerror})"
            self.d.spawn(self.d.sessions.release(s, why, code=P.Err.WORKER_DIED))
        self.d.pump.schedule()

    async def ask(
        self, s: Session, msg: P.Message, timeout: float, files: filestream.Receiver | None = None
    ) -> P.Message:
        """A request of the daemon's own (SNAPSHOT, RESTORE) to ``s``'s worker, and its
        answer; the worker's output meanwhile goes to the log, and the files it sends ahead
        of the answer to ``files``. Ends with the worker, a file piece that does not fit
        (FileStreamError), or after ``timeout`` (asyncio.TimeoutError)."""
        answer = asyncio.get_running_loop().create_future()
        self.asked[msg.id] = (s.wid, answer, files)
        try:
            self.send(s, msg)
            return await asyncio.wait_for(answer, timeout)
        finally:
            self.asked.pop(msg.id, None)

    def abandon(self, wid: str, why: str) -> None:
        """``wid``'s worker is gone: the daemon's requests to it end now, with ``why``."""
        for answer_wid, answer, _ in list(self.asked.values()):
            if answer_wid == wid and not answer.done():
                answer.set_exception(RuntimeError(why))

    def _answered(self, wid: str, msg: P.Message) -> bool:
        asked = self.asked.get(msg.parent)
        if asked is None or asked[0] != wid:
            return False
        _, answer, files = asked
        if answer.done():
            return True
        if msg.type in (P.Msg.REPLY, P.Msg.ERROR):
            answer.set_result(msg)
        elif msg.type == P.Msg.FILE and files is not None:
            try:
                files.add(msg)
            except (filestream.FileStreamError, OSError) as e:  # a worker's pieces are checked as hostile
                answer.set_exception(filestream.FileStreamError(f"its worker sent a bad file: {e}"))
        elif msg.type == P.Msg.STREAM:
            self.log.info("worker %s: %s", wid, str(msg.content.get("text", ""))[:2000].rstrip())
        return True

    def _on_message(self, frames: list) -> None:
        wid = frames[0].bytes.decode("utf-8", "replace")
        s = self.by_wid.get(wid)
        if s is None:
            return  # a worker we already let go of
        if self.dial_back and frames[0].get("User-Id") != wid:  # a key admits its own worker only
            self.log.warning("dropped a message that claims worker %s from another worker's connection", wid[:40])
            return
        try:
            _, rest = P.split_routing(frames[1:])
            msg = P.unpack(rest, s.signer, self.d.limits, P.EXECUTOR_REPLIES)
        except P.ProtocolError as e:
            self.log.warning("dropped a bad message from worker %s: %s", wid, e.text)
            if e.code == P.Err.TOO_LARGE and s.current is not None:  # say so where the output was due
                note = f"\n[jupyter-gpu] an output of this cell was dropped: {e.text} (max_header_bytes)\n"
                self.d.attach.relay(s, s.current.reply(P.Msg.STREAM, {"name": "stderr", "text": note}))
            return
        s.last_heard = time.monotonic()
        if msg.type == P.Msg.READY:
            if s.state == "adopting":
                self.d.attach.worker_ready(s, msg.content)
            if s.ready is not None and not s.ready.done():
                s.ready.set_result(msg.content)
            return
        if msg.type in (P.Msg.HEARTBEAT, P.Msg.PONG) or self._answered(wid, msg):
            return
        if msg.type == P.Msg.FILE:  # files go only to the daemon's own requests
            self.log.warning("session %s: dropped a file piece its worker sent unasked", s.id)
            return
        self.d.sessions.from_worker(s, msg)

    def move_bulk(self, moved: dict, src: str, dst: str) -> None:
        """Bulk files travel between a session's and its (warm-started) worker's directory
        by rename: same tmpfs, no bytes copied, names already checked."""
        src_dir, dst_dir = self.bulk_dir(src), paths.private_dir(self.bulk_dir(dst))
        for ref in moved.values():
            name = ref.get("file") if isinstance(ref, dict) else None
            if bulk.valid_name(name):
                try:
                    os.replace(paths.child(src_dir, name), paths.child(dst_dir, name))
                except (FileNotFoundError, UnsafePath):
                    pass  # the reader reports the missing buffer
