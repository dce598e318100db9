"""The executor's requests: execute a cell, pull values, answer pings, on one
persistent namespace. Started by ``kernel_worker.worker`` (the entry point)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import zmq

from kernel_worker import bulk, serialize
from kernel_worker import protocol as P
from kernel_worker.executor.channel import Channel
from kernel_worker.executor.imports import ImportCheck
from kernel_worker.executor.mirror import Mirror
from kernel_worker.executor.outbox import Outbox, StreamWriter, capture_fds
from kernel_worker.executor.restore import Restorer
from kernel_worker.executor.runner import Runner
from kernel_worker.executor.stdin import RemoteStdin

EXIT_LINGER_MS = 5000  # how long an exiting worker waits for its last reply to leave
FD_DRAIN_TIMEOUT_S = 2.0  # how long a reply waits for fd output written before it


def _versions() -> dict:
    import cloudpickle

    out = {
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "pyzmq": zmq.__version__,
        "pid": os.getpid(),
        "host": platform.node(),
    }
    for dist in ("numpy", "torch", "ipython"):
        try:  # from package metadata: importing torch here would cost seconds
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


class Executor:
    def __init__(self) -> None:
        self.session = os.environ[P.Env.SESSION]
        self.bulk_dir = os.environ.get(P.Env.BULK_DIR, "")
        self.signer = P.Signer(os.environ.pop(P.Env.KEY).encode())
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 1000
        self.sock.identity = self.session.encode()
        server = os.environ.get(P.Env.CURVE_SERVER)
        if server:  # a worker on another node: its own key pair, the daemon's public key
            secret = os.environ.pop(P.Env.CURVE_SECRET).encode()
            self.sock.curve_serverkey = server.encode()
            self.sock.curve_secretkey = secret
            self.sock.curve_publickey = zmq.curve_public(secret)
        self.outbox = Outbox(float(os.environ.get(P.Env.FLUSH_MS, "5")) / 1000)
        self.channel = Channel(
            self.sock, self.signer, self.outbox, self.session, float(os.environ.get(P.Env.HEARTBEAT_S, "2"))
        )
        # Connect only once the channel watches connection events: every connect, the
        # first included, is answered with READY.
        self.sock.connect(os.environ[P.Env.ENDPOINT])
        self.running = False
        self.fd_pumps: list = []  # started by main(), which captures fds 1 and 2
        self.received: dict[str, str] = {}  # name -> fingerprint of the value the notebook shipped
        self.cwd = ""  # the notebook's directory, once followed
        self.imports = ImportCheck()
        self.mirror = Mirror(self.channel)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Only a running cell is interrupted; between cells SIGINT is ignored.
        if self.running:
            raise KeyboardInterrupt

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Stopped (idle release, scancel): what this worker kept on its node goes, then it ends as asked.
        self.channel.remove_scratch()
        if os.getpid() == 1:  # a container's first process: the kernel drops a signal it sends itself
            os._exit(128 + signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_time_warning(self, signum: int, frame: Any) -> None:
        # The batch system's time limit is near (Slurm's --signal). Written from a thread:
        # the interrupted main thread may hold the output's lock.
        text = (
            f"\n[jupyter-gpu] this session's Slurm job reaches its time limit in about "
            f"{os.environ.get(P.Env.TIME_WARNING) or '?'} s: its worker and variables then end. Save what you need "
            "(to a volume or with --fetch), or ask the operator for a longer SlurmBackend.time_limit.\n"
        )
        if self.running:
            threading.Thread(target=sys.stderr.write, args=(text,), daemon=True).start()
        else:
            print(text.strip(), file=sys.__stderr__)

    def main(self) -> None:
        # Keep real stderr for our own diagnostics (it goes to the worker log).
        sys.__stderr__ = os.fdopen(os.dup(2), "w", buffering=1)
        self.fd_pumps = capture_fds(self.outbox)
        sys.stdout = StreamWriter("stdout", self.outbox)
        sys.stderr = StreamWriter("stderr", self.outbox)
        self.runner = Runner(self.outbox)
        self.stdin = RemoteStdin(self.channel)
        self.stdin.install()
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGUSR1, self._on_time_warning)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self.channel.flusher, name="jgpu-flush", daemon=True).start()
        self.channel.ready_content = {"versions": _versions(), "ipython": self.runner.shell is not None}
        shell = self.runner.shell
        transform = shell.transform_cell if shell else None
        self.restorer = Restorer(lambda: self.ns, self.received, transform, self.channel)
        handlers: dict[str, Callable[[P.Message], P.Message]] = {
            P.Msg.EXECUTE: self.execute,
            P.Msg.PULL: self.pull,
            P.Msg.PING: lambda m: m.reply(P.Msg.PONG),
            P.Msg.SNAPSHOT: self.restorer.take,
            P.Msg.RESTORE: self.restorer.restore,
        }
        while True:
            msg = self.channel.next_request()
            self.channel.busy.set()
            try:
                reply = handlers[msg.type](msg)
            finally:
                self.channel.busy.clear()
            with self.channel.lock:  # output first, then the reply, from this thread: no hand-off
                self.channel.flush()
                self.channel.send_streamed(reply)
            if reply.content.get("exit"):
                self.ctx.destroy(linger=EXIT_LINGER_MS)  # blocks until the reply has left
                self.channel.remove_scratch()
                os._exit(0)

    def _values_out(self, names: list, bulk_ok: bool) -> tuple[dict, list]:
        self.restorer.load(names)  # still in the snapshot it was restored from
        missing = [n for n in names if n not in self.ns]
        if missing:
            raise NameError(f"not defined on the worker: {', '.join(missing)}")
        specs, frames = serialize.dump_values({n: self.ns[n] for n in names})
        content: dict = {"values": specs}
        if bulk_ok and self.bulk_dir:
            frames, moved = bulk.offload(frames, self.bulk_dir)
            content["bulk"] = moved
        return content, frames

    def _follow(self, cwd: Any) -> None:
        """Work in the notebook's directory, as a local cell would (relative paths, `!cmd`,
        `import helper` from beside the notebook), when the notebook says where it is (it
        shares this host) and the directory exists here. Only a change of the notebook's
        directory moves the worker, so a cell's own chdir lasts as it would locally."""
        if not isinstance(cwd, str) or cwd == self.cwd or not os.path.isabs(cwd) or not os.path.isdir(cwd):
            return
        if self.cwd in sys.path:
            sys.path.remove(self.cwd)
        os.chdir(cwd)
        sys.path.insert(0, cwd)
        self.cwd = cwd

    def _missing(self, assumed: Any) -> list[str]:
        """Names a request assumes we hold that we do not: absent, or (for a value the
        notebook shipped) not the value it shipped. Whatever happened to this worker (a
        fresh start after a release, a restart, a second notebook on the session), the
        worker is the one that knows."""
        if not isinstance(assumed, dict):
            return []
        return sorted(
            name
            for name, fp in assumed.items()
            if name not in self.ns or (fp != P.WORKER_MADE and self.received.get(name) != fp)
        )

    @property
    def ns(self) -> dict:
        return self.runner.ns

    def execute(self, msg: P.Message) -> P.Message:
        self.outbox.parent = self.stdin.request = msg
        t0 = time.monotonic()
        ok, content, frames = True, {}, []
        loaded = False
        if msg.content.get("mirror"):  # the daemon's files are not here: local copies (workspace, packages),
            self.running = True  # first, so the imports check sees them; an interrupt ends the wait, and the cell
            try:
                self._follow(self.mirror.before(msg))
            except KeyboardInterrupt:
                ok = False
                self.outbox.send(
                    msg.reply(P.Msg.ERROR, _err("interrupted while the workspace was copied", KeyboardInterrupt()))
                )
            finally:
                self.running = False
        else:
            self._follow(msg.content.get("cwd"))  # `import helper` from beside the notebook
        if msg.content.get("imports"):  # modules the notebook has: a missing one stops the cell first
            missing, notes = self.imports.check(msg.content["imports"])
            if missing:
                self.outbox.send(
                    msg.reply(P.Msg.ERROR, {"ename": "ModuleNotFoundError", "evalue": missing, "traceback": []})
                )
                done = {"ok": False, "loaded": False, "bound": [], "deleted": [], "seconds": time.monotonic() - t0}
                return msg.reply(P.Msg.DONE, done)
            if notes:
                content["import_notes"] = notes
        if msg.content.get("lost_streams"):  # its values' chunks went elsewhere (a worker change): again
            names = sorted(str(spec.get("name")) for spec in msg.content.get("values") or [])
            return msg.reply(P.Msg.NEED, {"names": names})
        try:
            self.ns.update(serialize.receive_values(msg.content, msg.buffers, self.bulk_dir))
            loaded = True
        except Exception as e:
            ok = False
            self.outbox.send(msg.reply(P.Msg.ERROR, _err("could not load the values sent with the cell", e)))
        if loaded:
            for spec in msg.content.get("values") or []:
                self.received[spec["name"]] = str(spec.get("fp", ""))
            self.restorer.before_cell(msg.content.get("code", ""), msg.content.get("assumed"))
            need = self._missing(msg.content.get("assumed"))
            if need:  # the notebook believes we hold these, and we do not: nothing runs
                return msg.reply(P.Msg.NEED, {"names": need})
        code = msg.content.get("code", "")
        before = set(self.ns)
        if ok and code.strip():
            self.running = True
            try:
                ok = self.runner.run(code)
            except KeyboardInterrupt:  # landed outside the user's code
                ok = False
            finally:
                self.running = False
                self.stdin.request = None  # a thread's input() after the cell has nobody to ask
        sys.stdout.flush()
        for pump in self.fd_pumps:  # what C code and subprocesses wrote goes out before the reply
            pump.drain(FD_DRAIN_TIMEOUT_S)
        # What the cell (re)bound: new keys, plus the names its code assigns. Cheaper than
        # comparing the whole namespace, which IPython grows by two names per cell.
        if msg.content.get("mirror"):  # what the cell wrote there goes back first
            back = self.mirror.after(msg)
            if back is not None:
                with self.channel.lock:
                    self.channel.send(back)
        bound = (self.ns.keys() - before) | self.runner.assigned(code)
        content["bound"] = sorted(k for k in bound if k in self.ns and not k.startswith("_"))
        content["deleted"] = sorted(k for k in before - self.ns.keys() if not k.startswith("_"))
        for name in bound | (before - self.ns.keys()):
            self.received.pop(name, None)  # the worker's own value now, or none
        pull = msg.content.get("pull") or []
        if ok and pull:
            try:
                extra, frames = self._values_out(pull, bool(msg.content.get("bulk_ok")))
                content.update(extra)
            except Exception as e:
                ok = False
                self.outbox.send(msg.reply(P.Msg.ERROR, _err("could not send back --pull values", e)))
        content["ok"] = ok
        content["loaded"] = loaded
        if self.runner.exit_requested:
            content["exit"] = True
        content["seconds"] = time.monotonic() - t0
        return msg.reply(P.Msg.DONE, content, frames)

    def pull(self, msg: P.Message) -> P.Message:
        try:
            content, frames = self._values_out(msg.content.get("names", []), bool(msg.content.get("bulk_ok")))
        except Exception as e:
            self.outbox.send(msg.reply(P.Msg.ERROR, _err("pull failed", e)))
            content, frames = {"values": []}, []
        return msg.reply(P.Msg.VALUES, content, frames)


def _err(what: str, e: BaseException) -> dict:
    return {
        "ename": type(e).__name__,
        "evalue": f"{what}: {e}",
        "traceback": [entry.rstrip("\n") for entry in traceback.format_exception(type(e), e, e.__traceback__)],
    }
