"""REST endpoints under ``{base_url}/jupyter-gpu/api/``, every verb authenticated and
authorized: each goes through the server's Authorizer as an action on the resource
``jupyter_gpu`` (GET "read"; POST, DELETE "write"), so a deployment that lets a user look
but not act (JupyterHub roles, a custom ``ServerApp.authorizer_class``) is obeyed.

The daemon client blocks (it is the kernel's client), so each call runs in a worker
thread: the server never waits on the daemon. A daemon that cannot be reached is a 503
whose message the sidebar shows as is.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from traitlets import Float

from jupyter_gpu.client import DaemonError, DaemonLost
from jupyter_gpu.connect import DaemonTarget, TargetError
from jupyter_gpu.cost_report import BY, midnight_days_ago
from kernel_worker import protocol as P

API_PATH = "jupyter-gpu/api"
AUTH_RESOURCE = "jupyter_gpu"  # what the server's Authorizer is asked about
VERBS = ("get", "post", "put", "patch", "delete")
MAX_DAYS = 366  # GET cost?days=N: at most a year back

# A daemon's refusal, as the HTTP status the sidebar acts on.
STATUS_FOR = {
    P.Err.NO_SESSION: 404,
    P.Err.VOLUME: 409,
    P.Err.BUSY: 409,
    P.Err.BAD_MESSAGE: 400,
    P.Err.UNAVAILABLE: 409,
}


class DaemonLink(DaemonTarget):
    """The server's one connection to the daemon, reopened after it is lost."""

    request_timeout = Float(5.0, help="Seconds the sidebar's API waits for the daemon before answering 503.").tag(
        config=True
    )

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self._lock = threading.Lock()  # one request at a time on the one socket

    def call(self, type: str, content: dict | None = None, session: str = "") -> dict:
        """Blocking request/reply; run it in a thread."""
        with self._lock:
            try:
                client = self.connected()
            except DaemonError as e:  # no connection file, the embedded daemon would not start...
                raise TargetError(f"cannot reach the jupyter-gpu daemon: {e}") from None
            if client.url.startswith("ipc://") and not os.path.exists(client.url[len("ipc://") :]):
                self.disconnect()
                raise TargetError(
                    f"the jupyter-gpu daemon is not running (nothing listens at {client.url}); "
                    "a %%gpu cell starts the local one, or start it with `jupyter gpu daemon`"
                )
            try:
                return client.call(type, content, session, timeout=self.request_timeout)
            except DaemonLost:
                self.disconnect()  # a restarted daemon may have a new key or address: look again next time
                raise
            except DaemonError as e:
                if e.code == P.Err.BAD_SIGNATURE:
                    self.disconnect()
                raise


class GPUError(web.HTTPError):
    """An HTTP error whose JSON ``message`` is exactly ``message`` (tornado escapes '%' in
    log messages, and ours quote commands like ``%gpu release``)."""

    def __init__(self, status: int, message: str):
        super().__init__(status, "%s", message)
        self.message = message


class GPUHandler(APIHandler):
    """Base: talks to the daemon through the server's DaemonLink. Every verb is wrapped in
    ``@web.authenticated`` then ``@authorized`` (checked at load by ``setup_handlers``)."""

    auth_resource = AUTH_RESOURCE

    @property
    def link(self) -> DaemonLink:
        return self.settings["jupyter_gpu_link"]

    async def daemon(self, type: str, content: dict | None = None, session: str = "") -> dict:
        try:
            return await asyncio.to_thread(self.link.call, type, content, session)
        except TargetError as e:
            raise GPUError(503, str(e)) from None
        except DaemonLost as e:
            raise GPUError(503, f"the jupyter-gpu daemon is not answering: {e}") from None
        except DaemonError as e:
            if e.code in STATUS_FOR:
                raise GPUError(STATUS_FOR[e.code], str(e)) from None
            if e.code in (P.Err.BAD_SIGNATURE, P.Err.WORKER_START):
                raise GPUError(503, f"cannot use the jupyter-gpu daemon: {e}") from None
            raise GPUError(502, f"the jupyter-gpu daemon refused: {e}") from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None))[1]
        if isinstance(exc, GPUError):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": exc.message, "reason": exc.reason}))
        else:
            super().write_error(status_code, **kwargs)

    def reply(self, body: dict, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def body(self) -> dict:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            raise GPUError(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise GPUError(400, "the request body must be a JSON object")
        return data


class GPUsHandler(GPUHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        st = await self.daemon(P.Msg.STATUS)
        keep = ("backend", "gpus", "queue", "warm", "volumes")
        self.reply({k: st[k] for k in keep})


class SessionsHandler(GPUHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        st = await self.daemon(P.Msg.STATUS)
        self.reply({"sessions": st["sessions"]})


class SessionHandler(GPUHandler):
    @web.authenticated
    @authorized
    async def delete(self, session_id: str) -> None:
        done = await self.daemon(P.Msg.RELEASE, session=session_id)
        if not done.get("released"):
            raise GPUError(404, f"no session {session_id} to release (it may have ended already)")
        self.reply({"released": session_id})


class VolumesHandler(GPUHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        found = await self.daemon(P.Msg.VOLUMES, {"op": "ls"})
        self.reply({"volumes": found["result"], **({"note": found["note"]} if found.get("note") else {})})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        name = self.body().get("name")
        if not isinstance(name, str) or not name.strip():
            raise GPUError(400, 'POST volumes needs {"name": "NAME"}')
        made = await self.daemon(P.Msg.VOLUMES, {"op": "create", "name": name.strip()})
        self.reply(made["result"], status=201)


class VolumeHandler(GPUHandler):
    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        gone = await self.daemon(P.Msg.VOLUMES, {"op": "rm", "name": name})
        self.reply(gone["result"])


class CostHandler(GPUHandler):
    """``GET cost?days=N&by=KEY`` (or ``since=UNIX``): the daemon's spend report over the
    last N local days, today included (default 1: since midnight)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        raw, days = self.get_query_argument("since", ""), self.get_query_argument("days", "")
        if raw and days:
            raise GPUError(400, "give since or days, not both")
        try:
            since = float(raw) if raw else midnight_days_ago(self._days(days))
        except ValueError:
            raise GPUError(400, f"since must be unix seconds, not {raw[:40]!r}") from None
        content: dict[str, Any] = {"since": since}
        by = self.get_query_argument("by", "")
        if by:
            if by not in BY:
                raise GPUError(400, f"by must be one of {', '.join(BY)}, not {by[:40]!r}")
            content["by"] = by
        self.reply(await self.daemon(P.Msg.SPEND, content))

    @staticmethod
    def _days(raw: str) -> int:
        n = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 3 else 0
        if not raw:
            return 1
        if not 1 <= n <= MAX_DAYS:
            raise GPUError(400, f"days must be a whole number from 1 to {MAX_DAYS}, not {raw[:40]!r}")
        return n


ROUTES: list[tuple[str, type[GPUHandler]]] = [
    ("gpus", GPUsHandler),
    ("sessions", SessionsHandler),
    (r"sessions/(?P<session_id>[0-9A-Za-z_-]{1,128})", SessionHandler),
    ("volumes", VolumesHandler),
    (r"volumes/(?P<name>[^/]{1,128})", VolumeHandler),
    ("cost", CostHandler),
]


def unauthenticated(handlers: list[tuple[str, type]]) -> list[str]:
    """``Class.verb`` for every HTTP verb not wrapped in ``tornado.web.authenticated``."""
    marker = web.authenticated(lambda self: None).__code__
    missing = []
    for _, cls in handlers:
        for verb in VERBS:
            method = cls.__dict__.get(verb)
            if method is not None and getattr(method, "__code__", None) is not marker:
                missing.append(f"{cls.__name__}.{verb}")
    return missing


def unauthorized(handlers: list[tuple[str, type]]) -> list[str]:
    """``Class.verb`` for every HTTP verb whose ``@web.authenticated`` does not directly wrap
    jupyter_server's ``@authorized``, or whose class names no ``auth_resource``: without both,
    a restrictive Authorizer would never be asked, and a read-only user could release
    anyone's session or delete volumes."""
    marker = authorized(lambda self: None).__code__
    missing = []
    for _, cls in handlers:
        for verb in VERBS:
            method = cls.__dict__.get(verb)
            if method is None:
                continue
            inner = getattr(method, "__wrapped__", None)
            if getattr(inner, "__code__", None) is not marker or not getattr(cls, "auth_resource", None):
                missing.append(f"{cls.__name__}.{verb}")
    return missing


def setup_handlers(serverapp: Any) -> None:
    """Serve the API, refusing to load if any verb could skip authentication or authorization."""
    missing = unauthenticated(ROUTES)
    if missing:  # never serve an endpoint anyone on the network could call
        raise RuntimeError(f"jupyter-gpu handlers without @web.authenticated: {', '.join(missing)}")
    missing = unauthorized(ROUTES)
    if missing:  # nor one the server's Authorizer is never asked about
        raise RuntimeError(
            f"jupyter-gpu handlers without @authorized inside @web.authenticated (and an auth_resource): "
            f"{', '.join(missing)}"
        )
    web_app = serverapp.web_app
    web_app.settings["jupyter_gpu_link"] = DaemonLink(parent=serverapp)
    base = url_path_join(web_app.settings["base_url"], API_PATH)
    web_app.add_handlers(".*$", [(url_path_join(base, path), cls) for path, cls in ROUTES])
