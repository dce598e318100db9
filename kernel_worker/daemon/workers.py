"""The executors' side of the daemon: one ROUTER socket that every worker dials back to
(through an ipc socket in its own session directory), and a worker's life: its
directories, start (until it says READY), the messages it sends, stop.

A worker's id (``wid``) names its socket, log, bulk directory and container: the session
id, or a warm worker's own id until a session takes it over.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

import zmq

from kernel_worker import bulk
from kernel_worker import protocol as P
from kernel_worker.backends import WorkerSpec
from kernel_worker.backends.base import SOCKET_NAME
from kernel_worker.daemon import paths
from kernel_worker.daemon.errors import UnsafePath
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon


class Workers:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.by_wid: dict[str, Session] = {}  # for messages from workers
        self.sock: zmq.Socket | None = None
        self.asked: dict[str, tuple[str, asyncio.Future]] = {}  # the daemon's own requests: id -> (wid, answer)

    def open(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.router_mandatory = True  # a worker that is not connected is an error, not a silent drop
        self.d.pump.add(self.sock, self._on_message)

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
        return f"ipc://{os.path.join(self.session_dir(wid), SOCKET_NAME)}"

    def bind(self, wid: str) -> None:
        self.sock.bind(self.endpoint(wid))

    def remove_dirs(self, wid: str, session: str = "") -> None:
        """A worker's directories, and the bulk files of the session it served."""
        try:
            dirs = {self.bulk_dir(wid), self.bulk_dir(session or wid), self.session_dir(wid)}
        except UnsafePath as e:  # only names the daemon checked get here: a bug, never a reason to rmtree
            self.log.error("not removing the directories of worker %r: %s", wid, e)
            return
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ life

    async def start(self, s: Session) -> None:
        """Start ``s``'s worker and wait until it says READY (or fails, or times out)."""
        s.ready = asyncio.get_running_loop().create_future()
        for d in (self.bulk_dir(s.wid), self.session_dir(s.wid)):
            paths.private_dir(d)
        self.bind(s.wid)
        self.by_wid[s.wid] = s
        env = {
            P.Env.SESSION: s.wid,
            P.Env.KEY: s.key.decode(),
            P.Env.FLUSH_MS: str(self.d.flush_ms),
            P.Env.HEARTBEAT_S: str(self.d.worker_heartbeat_interval),
            P.Env.ORPHAN_S: str(self.d.backend_instance.orphan_timeout),
        }
        options = {k: s.current.content.get(k) for k in ("image", "volumes")} if s.current else {}
        spec = WorkerSpec(
            s.wid, s.gpus, env, self.session_dir(s.wid), self.bulk_dir(s.wid), self.log_path(s.wid), s.user, options
        )
        s.handle = await self._started(spec)
        if s.releasing:  # released while the backend was starting it: stop() found nothing to stop
            await self.d.backend_instance.stop(s.handle)
            raise RuntimeError(f"session {s.id} was released while its worker started")
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
        try:
            self.sock.unbind(self.endpoint(s.wid))
        except zmq.ZMQError:
            pass  # never bound: the start failed before
        if self.by_wid.get(s.wid) is s:
            del self.by_wid[s.wid]
        self.d.records.remove(s.wid)
        self.remove_dirs(s.wid, s.id)

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

    async def ask(self, s: Session, msg: P.Message, timeout: float) -> P.Message:
        """A request of the daemon's own (SNAPSHOT, RESTORE) to ``s``'s worker, and its
        answer; the worker's output meanwhile goes to the log. Ends with the worker, or
        after ``timeout`` (asyncio.TimeoutError)."""
        answer = asyncio.get_running_loop().create_future()
        self.asked[msg.id] = (s.wid, answer)
        try:
            self.send(s, msg)
            return await asyncio.wait_for(answer, timeout)
        finally:
            self.asked.pop(msg.id, None)

    def abandon(self, wid: str, why: str) -> None:
        """``wid``'s worker is gone: the daemon's requests to it end now, with ``why``."""
        for answer_wid, answer in list(self.asked.values()):
            if answer_wid == wid and not answer.done():
                answer.set_exception(RuntimeError(why))

    def _answered(self, wid: str, msg: P.Message) -> bool:
        asked = self.asked.get(msg.parent)
        if asked is None or asked[0] != wid:
            return False
        if msg.type in (P.Msg.REPLY, P.Msg.ERROR) and not asked[1].done():
            asked[1].set_result(msg)
        elif msg.type == P.Msg.STREAM:
            self.log.info("worker %s: %s", wid, str(msg.content.get("text", ""))[:2000].rstrip())
        return True

    def _on_message(self, frames: list) -> None:
        wid = frames[0].bytes.decode("utf-8", "replace")
        s = self.by_wid.get(wid)
        if s is None:
            return  # a worker we already let go of
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
