"""The executor: runs a session's cells in one persistent namespace.

It is started by a backend (a local process, a container) and dials back to the
daemon. It needs only Python, pyzmq and cloudpickle, so it can be injected into
any image; with IPython present, cells run through ``InteractiveShell`` (magics,
``!cmd``, ``display()``, inline matplotlib, the last expression as Out[]).

Threads: the main thread runs user code (so SIGINT lands there as
KeyboardInterrupt); one I/O thread owns the ZeroMQ socket. Everything the cell
emits goes through an ordered ``Outbox`` that coalesces stream text and is flushed
by the I/O thread every ``JUPYTER_GPU_FLUSH_MS`` or at once for non-stream messages.
"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import os
import platform
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import zmq
import zmq.utils.monitor

from kernel_worker import bulk, serialize
from kernel_worker import protocol as P

ENV_ENDPOINT = "JUPYTER_GPU_ENDPOINT"
ENV_SESSION = "JUPYTER_GPU_SESSION"
ENV_KEY = "JUPYTER_GPU_SESSION_KEY"
ENV_BULK_DIR = "JUPYTER_GPU_BULK_DIR"
ENV_FLUSH_MS = "JUPYTER_GPU_FLUSH_MS"
ENV_HEARTBEAT_S = "JUPYTER_GPU_HEARTBEAT_S"
ENV_ORPHAN_S = "JUPYTER_GPU_ORPHAN_S"


class Outbox:
    """Ordered outgoing messages; consecutive writes to one stream merge into one message.

    Stream text waits up to ``flush_s`` to be batched; any other message is sent at
    once, behind the text that came before it.
    """

    def __init__(self, flush_s: float) -> None:
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._items: list = []  # [stream_name, [texts]] or Message
        self._since = 0.0  # when the oldest pending item was queued
        self._urgent = False
        self._text: list | None = None  # texts of the last item, if it is a stream's
        self._text_name: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.parent: P.Message | None = None  # the request whose output this is

    def fileno(self) -> int:
        return self._wake_r

    def _queue(self, item: Any, urgent: bool) -> None:
        with self._lock:
            wake = urgent or not self._items
            if not self._items:
                self._since = time.monotonic()
            self._items.append(item)
            self._text = None if urgent else item[1]
            self._text_name = None if urgent else item[0]
            self._urgent |= urgent
        if wake:
            os.write(self._wake_w, b"x")

    def stream(self, name: str, text: str) -> None:
        if not text:
            return
        with self._lock:  # the hot path of print(): append to the pending text of this stream
            if self._text_name == name:
                self._text.append(text)
                return
        self._queue([name, [text]], False)

    def send(self, msg: P.Message) -> None:
        self._queue(msg, True)

    def skip_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def due_in(self, idle: float) -> float:
        """Seconds until the outbox should be flushed (``idle`` when empty)."""
        with self._lock:
            if not self._items:
                return idle
            if self._urgent:
                return 0.0
            return max(0.0, self._since + self.flush_s - time.monotonic())

    def drain(self) -> list[P.Message]:
        self.skip_wake()
        with self._lock:
            items, self._items, self._urgent = self._items, [], False
            self._text = self._text_name = None
        parent = self.parent
        out = []
        for item in items:
            if isinstance(item, list):
                if parent is not None:
                    out.append(parent.reply(P.Msg.STREAM, {"name": item[0], "text": "".join(item[1])}))
            else:
                out.append(item)
        return out


class StreamWriter(io.TextIOBase):
    """sys.stdout / sys.stderr replacement feeding the outbox."""

    def __init__(self, name: str, outbox: Outbox):
        self.name = name
        self._outbox = outbox

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._outbox.stream(self.name, text)
        return len(text)

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


class Channel:
    """The socket to the daemon, shared by two threads under one lock.

    Between requests the main thread holds it: it waits for the next request, sends
    heartbeats and flushes stray output itself, so a request and its reply cost no
    thread hand-off. While a request runs, the flusher thread sends batched output.
    Every send drains the outbox under the lock, which keeps messages in order.
    """

    def __init__(self, sock: zmq.Socket, signer: P.Signer, outbox: Outbox, session: str, heartbeat_s: float):
        self.sock, self.signer, self.outbox, self.session = sock, signer, outbox, session
        self.heartbeat_s = heartbeat_s
        self.lock = threading.Lock()
        self.busy = threading.Event()  # set while a request runs: the flusher's turn
        self._next_beat = time.monotonic() + heartbeat_s
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(outbox.fileno(), zmq.POLLIN)
        # The daemon going away (crash, kill -9) closes its socket. A daemon that comes back
        # within ``orphan_s`` adopts us again; otherwise nobody will ever send us work, so
        # the worker ends instead of holding its GPU forever.
        self.orphan_s = float(os.environ.get(ENV_ORPHAN_S, "0"))
        self._lost_since: float | None = None
        self.ready_content: dict = {}
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self._poller.register(self._monitor, zmq.POLLIN)

    def send(self, msg: P.Message) -> None:
        """Send one message now. Caller holds the lock (and has flushed the outbox)."""
        self.sock.send_multipart(P.pack(msg, self.signer), copy=False)

    def flush(self) -> None:
        """Send what the outbox holds, plus a heartbeat when one is due. Caller holds the lock."""
        for msg in self.outbox.drain():
            self.send(msg)
        now = time.monotonic()
        if now >= self._next_beat:
            self.send(P.Message(P.Msg.HEARTBEAT, {}, self.session))
            self._next_beat = now + self.heartbeat_s

    def next_request(self) -> P.Message:
        """Main thread, between requests: block until the daemon sends one."""
        with self.lock:
            self.flush()
            while True:
                wait = min(self.outbox.due_in(self.heartbeat_s), max(0.0, self._next_beat - time.monotonic()))
                if self._lost_since is not None:
                    left = self._lost_since + self.orphan_s - time.monotonic()
                    if left <= 0:
                        print(
                            "jupyter-gpu executor: the daemon went away and did not come back; exiting",
                            file=sys.__stderr__,
                        )
                        os._exit(3)
                    wait = min(wait, left)
                events = dict(self._poller.poll(wait * 1000))
                if self._monitor in events:
                    event = zmq.utils.monitor.parse_monitor_message(self._monitor.recv_multipart())
                    connected = event["event"] == zmq.EVENT_CONNECTED
                    self._lost_since = None if connected else (self._lost_since or time.monotonic())
                    if connected:  # a (restarted) daemon is there: say who we are
                        self.send(P.Message(P.Msg.READY, self.ready_content, self.session))
                    continue
                if not events or self.outbox.due_in(self.heartbeat_s) == 0.0:
                    self.flush()
                    continue
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self.outbox.skip_wake()  # only the wake pipe: output not due yet
                    continue
                try:
                    _, rest = P.split_routing(frames)
                    return P.unpack(rest, self.signer, allowed=P.EXECUTOR_REQUESTS)
                except P.ProtocolError as e:
                    print(f"jupyter-gpu executor: dropped bad message: {e}", file=sys.__stderr__)

    def flusher(self) -> None:
        """Flusher thread: while a request runs, send output as it comes due."""
        while True:
            self.busy.wait()
            wait = min(self.outbox.due_in(self.heartbeat_s), max(0.0, self._next_beat - time.monotonic()))
            ready = select.select([self.outbox.fileno()], [], [], wait)[0]
            if self.outbox.due_in(self.heartbeat_s) == 0.0 or time.monotonic() >= self._next_beat:
                with self.lock:
                    self.flush()
            elif ready:
                self.outbox.skip_wake()


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


class Runner:
    """Runs code in the persistent namespace, reporting output through the outbox."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.shell = None
        try:
            self.shell = _make_shell(outbox, self.ns)
        except ImportError:
            pass

    def assigned(self, code: str) -> set[str]:
        """Names ``code`` binds anywhere (a superset of what it rebinds globally)."""
        if not code.strip():
            return set()
        try:
            tree = ast.parse(code)
        except SyntaxError:  # IPython syntax (%magic, !cmd): transform it first
            try:
                tree = ast.parse(self.shell.transform_cell(code) if self.shell is not None else code)
            except SyntaxError:
                return set()
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Global):
                names.update(node.names)
        return names

    def run(self, code: str) -> bool:
        """Run ``code``; True when it raised nothing."""
        if self.shell is not None:
            result = self.shell.run_cell(code, store_history=True)
            return result.success
        try:
            tree = ast.parse(code, "<cell>")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<cell>", "exec"), self.ns)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), self.ns)
                if value is not None:
                    self.ns["_"] = value
                    self.outbox.send(
                        self.outbox.parent.reply(P.Msg.RESULT, {"data": {"text/plain": repr(value)}, "metadata": {}})
                    )
            return True
        except BaseException as e:  # the user's exception, KeyboardInterrupt included
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            self.outbox.send(
                self.outbox.parent.reply(P.Msg.ERROR, {"ename": type(e).__name__, "evalue": str(e), "traceback": tb})
            )
            return False


def _make_shell(outbox: Outbox, ns: dict) -> Any:
    """An InteractiveShell whose displays, results and tracebacks go to the outbox."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type

    def reply(kind: str, content: dict) -> None:
        outbox.send(outbox.parent.reply(kind, content))

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            kind = P.Msg.UPDATE_DISPLAY if update else P.Msg.DISPLAY
            reply(kind, {"data": data, "metadata": metadata or {}, "transient": transient or {}})

        def clear_output(self, wait=False):
            reply(P.Msg.CLEAR, {"wait": bool(wait)})

    class Hook(DisplayHook):
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            reply(P.Msg.RESULT, {"data": format_dict, "metadata": md_dict or {}})

    class WorkerShell(InteractiveShell):
        display_pub_class = Type(Publisher)
        displayhook_class = Type(Hook)

        def _showtraceback(self, etype, evalue, stb):
            reply(
                P.Msg.ERROR, {"ename": getattr(etype, "__name__", str(etype)), "evalue": str(evalue), "traceback": stb}
            )

        def enable_gui(self, gui=None):
            pass

    from traitlets.config import Config

    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # History lives in memory: the SQLite history thread would cost every cell a commit.
    config = Config({"HistoryManager": {"hist_file": ":memory:"}})
    return WorkerShell.instance(user_ns=ns, colors="Linux", config=config)


def _capture_fds(outbox: Outbox) -> None:
    """Route file-descriptor level output (C libraries, ``os.system``) into the cell's streams."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)

        def pump(r: int = r, name: str = name) -> None:
            while True:
                data = os.read(r, 65536)
                if not data:
                    return
                outbox.stream(name, data.decode("utf-8", "replace"))

        threading.Thread(target=pump, name=f"jgpu-fd{fd}", daemon=True).start()


class Executor:
    def __init__(self) -> None:
        self.session = os.environ[ENV_SESSION]
        self.bulk_dir = os.environ.get(ENV_BULK_DIR, "")
        self.signer = P.Signer(os.environ.pop(ENV_KEY).encode())
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 1000
        self.sock.identity = self.session.encode()
        self.outbox = Outbox(float(os.environ.get(ENV_FLUSH_MS, "5")) / 1000)
        self.channel = Channel(
            self.sock, self.signer, self.outbox, self.session, float(os.environ.get(ENV_HEARTBEAT_S, "2"))
        )
        # Connect only once the channel watches connection events: every connect, the
        # first included, is answered with READY.
        self.sock.connect(os.environ[ENV_ENDPOINT])
        self.running = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Only a running cell is interrupted; between cells SIGINT is ignored.
        if self.running:
            raise KeyboardInterrupt

    def main(self) -> None:
        # Keep real stderr for our own diagnostics (it goes to the worker log).
        sys.__stderr__ = os.fdopen(os.dup(2), "w", buffering=1)
        _capture_fds(self.outbox)
        sys.stdout = StreamWriter("stdout", self.outbox)
        sys.stderr = StreamWriter("stderr", self.outbox)
        self.runner = Runner(self.outbox)
        signal.signal(signal.SIGINT, self._on_sigint)
        threading.Thread(target=self.channel.flusher, name="jgpu-flush", daemon=True).start()
        self.channel.ready_content = {"versions": _versions(), "ipython": self.runner.shell is not None}
        handlers: dict[str, Callable[[P.Message], P.Message]] = {
            P.Msg.EXECUTE: self.execute,
            P.Msg.PULL: self.pull,
            P.Msg.PING: lambda m: m.reply(P.Msg.PONG),
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
                self.channel.send(reply)

    def _values_out(self, names: list, bulk_ok: bool) -> tuple[dict, list]:
        missing = [n for n in names if n not in self.ns]
        if missing:
            raise NameError(f"not defined on the worker: {', '.join(missing)}")
        specs, frames = serialize.dump_values({n: self.ns[n] for n in names})
        content: dict = {"values": specs}
        if bulk_ok and self.bulk_dir:
            frames, moved = bulk.offload(frames, self.bulk_dir)
            content["bulk"] = moved
        return content, frames

    @property
    def ns(self) -> dict:
        return self.runner.ns

    def execute(self, msg: P.Message) -> P.Message:
        self.outbox.parent = msg
        t0 = time.monotonic()
        ok, content, frames = True, {}, []
        loaded = False
        try:
            self.ns.update(serialize.receive_values(msg.content, msg.buffers, self.bulk_dir))
            loaded = True
        except Exception as e:
            ok = False
            self.outbox.send(msg.reply(P.Msg.ERROR, _err("could not load the values sent with the cell", e)))
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
        sys.stdout.flush()
        # What the cell (re)bound: new keys, plus the names its code assigns. Cheaper than
        # comparing the whole namespace, which IPython grows by two names per cell.
        bound = (self.ns.keys() - before) | self.runner.assigned(code)
        content["bound"] = sorted(k for k in bound if k in self.ns and not k.startswith("_"))
        content["deleted"] = sorted(k for k in before - self.ns.keys() if not k.startswith("_"))
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
        "traceback": traceback.format_exception(type(e), e, e.__traceback__),
    }


if __name__ == "__main__":
    from kernel_worker.worker import main

    main()
