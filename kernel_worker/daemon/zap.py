"""The daemon's one ZAP handler (ZeroMQ allows one per context), serving every CURVE
socket of the daemon: the notebooks' socket (keys in ``authorized_keys``) and the socket
that workers on other nodes dial back to (one key pair per session). Each socket names
its own ZAP domain; the handler asks that domain's ``who`` for the connecting key and
admits it under the user id ``who`` returns, which every message of that connection then
carries (``frame.get("User-Id")``): nothing a peer sends can change it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import zmq
import zmq.utils.z85

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
Who = Callable[[str], "str | None"]  # a CURVE public key (z85) -> its user id, or None: refused


class Zap:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.sock: zmq.Socket | None = None
        self.domains: dict[bytes, Who] = {}

    def serve(self, ctx: zmq.Context, sock: zmq.Socket, domain: bytes, who: Who) -> None:
        """Make ``sock`` a CURVE server whose peers ``who`` admits (before anything of
        theirs is read)."""
        if self.sock is None:
            self.sock = ctx.socket(zmq.REP)
            self.sock.linger = 0
            self.sock.bind(ZAP_ENDPOINT)
            self.d.pump.add(self.sock, self._on_request)
        self.domains[domain] = who
        sock.curve_server = True
        sock.zap_domain = domain

    def _on_request(self, frames: list) -> None:
        """One ZAP request: version, id, domain, address, identity, mechanism, credentials."""
        version, request_id, domain, address, _identity, mechanism = (f.bytes for f in frames[:6])
        public = zmq.utils.z85.encode(frames[6].bytes).decode() if mechanism == b"CURVE" and len(frames) > 6 else ""
        who = self.domains.get(domain)
        user = who(public) if who is not None and public else None
        if user is None:
            self.d.log.warning(
                "refused a CURVE connection to %s from %s: key %s is not authorised",
                domain.decode(errors="replace"),
                address.decode(errors="replace"),
                public or "-",
            )
            self.sock.send_multipart([version, request_id, b"400", b"key not authorised", b"", b""])
        else:
            self.sock.send_multipart([version, request_id, b"200", b"OK", user.encode(), b""])
        self.d.pump.schedule()
