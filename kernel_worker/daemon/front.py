"""The notebooks' side of the daemon: one ROUTER socket, who is on the other end (the
CURVE key's user, through our own ZAP handler, or the daemon's user on ipc/loopback),
unpacking and checking every request, and a dispatch table from message type to
handler, as ipykernel's ``shell_handlers``.

A handler takes ``(ident, msg, user)``. It answers at once, or returns an awaitable
that the daemon runs as an owned task. Either way an exception in it costs that one
request an error reply, never the loop.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import zmq

from kernel_worker import keys
from kernel_worker import protocol as P
from kernel_worker.daemon import paths
from kernel_worker.daemon.errors import StartRefused

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

Handler = Callable[[bytes, P.Message, str], "Awaitable[None] | None"]

# Requests about one session: only the user who made that session may send them.
SESSION_REQUESTS = frozenset(
    {
        P.Msg.EXECUTE,
        P.Msg.PULL,
        P.Msg.INTERRUPT,
        P.Msg.RELEASE,
        P.Msg.COST,
        P.Msg.INPUT_REPLY,
        P.Msg.SNAPSHOT,
        P.Msg.CHUNK,
    }
)
FRAME_SLACK = 64 * 1024**2  # a frame this far over max_message_bytes is cut off unread
ZAP_DOMAIN = b"jupyter-gpu"


class Front:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log
        self.sock: zmq.Socket | None = None
        self.authorized: keys.Authorized | None = None
        self.last_request = time.monotonic()
        self._clients: dict[bytes, tuple[str, P.Signer]] = {}  # routing id -> (user, signer)
        self._key_signers: dict[str, P.Signer] = {}  # CURVE public key -> its signer
        self.handlers: dict[str, Handler] = {}

    def route(self, handlers: dict[str, Handler]) -> None:
        """Install the dispatch table; every request type a client may send needs a handler."""
        missing = P.CLIENT_REQUESTS - set(handlers)
        if missing:
            raise RuntimeError(f"no daemon handler for {', '.join(sorted(missing))}")
        self.handlers = handlers

    def open(self, ctx: zmq.Context) -> str:
        """Bind the client socket (with CURVE when configured); the address actually bound."""
        url = self.d.url
        check_bindable(url, self.d.curve)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        # Frames arrive whole before any check: one huge unsigned frame would be buffered
        # first. ZeroMQ drops a connection whose frame exceeds this, as it reads the size.
        self.sock.maxmsgsize = self.d.max_message_bytes + FRAME_SLACK
        self.sock.rcvhwm = self.d.peer_queue
        if self.d.curve:
            self._setup_curve(ctx)
        ipc = url[len("ipc://") :] if url.startswith("ipc://") else ""
        if ipc and not os.path.isdir(os.path.dirname(ipc) or "."):
            paths.private_dir(os.path.dirname(ipc))  # never 0755: the socket's directory is ours alone
        self.sock.bind(url)
        if ipc:
            os.chmod(ipc, 0o600)  # not the umask's 0775: only this user may connect
        self.d.pump.add(self.sock, self._on_message)
        return self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    # ------------------------------------------------------------------ identification

    def _setup_curve(self, ctx: zmq.Context) -> None:
        """CurveZMQ on the client socket; the daemon's ZAP handler admits only authorised
        keys, before any request from them is read."""
        public, secret = keys.load(self.d.keys_dir)
        self.authorized = keys.Authorized(self.d.keys_dir)
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        authorized = self.authorized
        self.d.zap.serve(ctx, self.sock, ZAP_DOMAIN, lambda key: key if authorized.user(key) else None)

    def _identify(self, frame: Any) -> tuple[str, P.Signer] | None:
        """Who sent this, as the daemon established it: the user its CURVE key is authorised
        as, or the daemon's own user on ipc/loopback. None: a key no longer authorised."""
        if not self.d.curve:
            return self.d.user, self.d.signer
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

    # ------------------------------------------------------------------ requests

    def _on_message(self, frames: list) -> None:
        self.last_request = time.monotonic()
        ident = frames[0].bytes
        who = self._identify(frames[0])
        if who is None:
            self.log.warning("dropped a request: its CURVE key was revoked")
            return
        user, signer = self._clients[ident] = who
        try:
            _, rest = P.split_routing(frames[1:])
            msg = P.unpack(rest, signer, self.d.limits, P.CLIENT_REQUESTS)
        except P.ProtocolError as e:
            self.log.warning("refused a request: %s", e.text)
            self.fail(ident, e.msg_id, e.code, e.text)
            return
        owner = self.d.sessions.owners.get(msg.session)
        if msg.type in SESSION_REQUESTS and owner is not None and owner != user:
            # Same answer as for a session that does not exist: nothing to learn from it.
            self.fail(ident, msg, P.Err.NO_SESSION, f"you have no session {msg.session}")
            return
        try:
            result = self.handlers[msg.type](ident, msg, user)
        except Exception as e:  # a bug must cost one reply, not the daemon
            self._handler_failed(ident, msg, e)
            return
        if inspect.isawaitable(result):
            self.d.spawn(self._guarded(result, ident, msg))

    async def _guarded(self, work: Awaitable[None], ident: bytes, msg: P.Message) -> None:
        try:
            await work
        except Exception as e:
            self._handler_failed(ident, msg, e)

    def _handler_failed(self, ident: bytes, msg: P.Message, e: Exception) -> None:
        self.log.error("error handling %s", msg.type, exc_info=e)
        self.fail(ident, msg, P.Err.BAD_MESSAGE, f"daemon could not handle {msg.type}: {e}")

    # ------------------------------------------------------------------ replies

    def send(self, ident: bytes, msg: P.Message) -> None:
        # ROUTER sends never block: unroutable peers are dropped by ZeroMQ.
        signer = self._clients.get(ident, (None, self.d.signer))[1]
        self.sock.send_multipart([ident, *P.pack(msg, signer)], copy=False)
        self.d.pump.schedule()  # a send can swallow the FD's edge

    def reply(self, ident: bytes, msg: P.Message, content: dict, type: str = P.Msg.REPLY) -> None:
        self.send(ident, msg.reply(type, content))

    def fail(self, ident: bytes, parent: P.Message | str | None, code: str, text: str, **extra: Any) -> None:
        if isinstance(parent, P.Message):
            msg = parent.reply(P.Msg.FAIL, {"code": code, "message": text, **extra})
        else:
            msg = P.Message(P.Msg.FAIL, {"code": code, "message": text, **extra}, parent=parent or "")
        self.send(ident, msg)


def check_bindable(url: str, curve: bool = False) -> None:
    """Only ipc and loopback tcp: anything reachable from other machines needs CurveZMQ
    encryption and per-user keys."""
    if P.on_this_host(url) or (curve and P.tcp_host(url)):
        return
    raise StartRefused(
        f"refusing to listen on {url}: only ipc:// and tcp://127.0.0.1 are allowed without CurveZMQ; "
        "use --WorkerDaemon.curve=True (after `jupyter gpu keys init`), or an SSH tunnel to a loopback port"
    )
