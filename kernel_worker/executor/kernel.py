"""What a local kernel gives a cell beyond its shell, on the worker: ``get_ipython().kernel``
(its ``session.send`` to ``iopub_socket``, ``get_parent()``, ``send_response``,
``comm_manager``, ``language_info``) and the shell's ``get_parent()`` / ``parent_header``,
as ipykernel's ``ZMQInteractiveShell`` has them.

Code that writes Jupyter messages itself (``kernel.session.send(kernel.iopub_socket,
"display_data", ...)``) gets them shown in the cell as a local kernel would show them: a
stream, a display, a display update, a result, a clear, an error. Messages with no
frontend here to take them (``comm_*``, ``status``...) go nowhere, as a comm's do on the
worker (``widgets``)."""

from __future__ import annotations

import datetime
import getpass
import platform
import sys
import uuid
from typing import Any, Callable

from kernel_worker import protocol as P
from kernel_worker.executor.outbox import Outbox

PROTOCOL = "5.3"  # the Jupyter messaging protocol version a header says
# Jupyter message types shown in the cell, and what each is on our wire.
SHOWN = {
    "display_data": P.Msg.DISPLAY,
    "update_display_data": P.Msg.UPDATE_DISPLAY,
    "execute_result": P.Msg.RESULT,
    "clear_output": P.Msg.CLEAR,
    "error": P.Msg.ERROR,
}


class IOPubSocket:
    """``kernel.iopub_socket``: what ``session.send`` is told to send on. No socket: the
    worker's output goes through its outbox, in order with everything else."""

    def __repr__(self) -> str:
        return "<jupyter-gpu worker iopub>"


def _header(msg_type: str, session: str) -> dict:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": session,
        "username": _user(),
        "date": datetime.datetime.now(datetime.timezone.utc),
        "version": PROTOCOL,
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001  no passwd entry for a container's uid
        return "username"


class KernelSession:
    """``kernel.session``: builds messages as jupyter_client's ``Session`` does, and
    ``send`` shows those sent to ``iopub_socket`` in the running cell."""

    def __init__(self, iopub: IOPubSocket, show: Callable[[str, dict], None]):
        self.session = uuid.uuid4().hex
        self.username = _user()
        self._iopub = iopub
        self._show = show

    def msg_header(self, msg_type: str) -> dict:
        return _header(msg_type, self.session)

    def msg(
        self,
        msg_type: str,
        content: dict | None = None,
        parent: dict | None = None,
        header: dict | None = None,
        metadata: dict | None = None,
    ) -> dict:
        header = header or self.msg_header(msg_type)
        parent = parent or {}
        return {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": parent.get("header", parent) if isinstance(parent, dict) else {},
            "content": {} if content is None else content,
            "metadata": metadata or {},
        }

    def send(
        self,
        stream: Any,
        msg_or_type: dict | str,
        content: dict | None = None,
        parent: dict | None = None,
        ident: Any = None,
        buffers: list | None = None,
        track: bool = False,
        header: dict | None = None,
        metadata: dict | None = None,
    ) -> dict:
        if isinstance(msg_or_type, dict):
            msg = msg_or_type
        else:
            msg = self.msg(msg_or_type, content, parent, header, metadata)
        if stream is self._iopub:
            self._show(str(msg.get("msg_type") or msg.get("header", {}).get("msg_type", "")), msg.get("content") or {})
        return msg


class WorkerKernel:
    """``get_ipython().kernel`` on the worker: the parts of ipykernel's kernel that cell
    code and widget libraries reach for."""

    def __init__(self, shell: Any, outbox: Outbox, reply: Callable[[str, dict], None]):
        self.shell = shell
        self._outbox = outbox
        self._reply = reply
        self.iopub_socket = IOPubSocket()
        self.session = KernelSession(self.iopub_socket, self._show)
        self.language_info = {
            "name": "python",
            "version": platform.python_version(),
            "mimetype": "text/x-python",
            "codemirror_mode": {"name": "ipython", "version": sys.version_info[0]},
            "pygments_lexer": f"ipython{sys.version_info[0]}",
            "nbconvert_exporter": "python",
            "file_extension": ".py",
        }

    def get_parent(self, channel: str | None = None) -> dict:
        return parent_of(self._outbox.parent, self.session.session)

    @property
    def _parent_header(self) -> dict:  # ipykernel < 6: the request being answered
        return self.get_parent()

    @property
    def comm_manager(self) -> Any:
        import comm

        return comm.get_comm_manager()

    def send_response(
        self,
        stream: Any,
        msg_or_type: dict | str,
        content: dict | None = None,
        ident: Any = None,
        buffers: list | None = None,
        track: bool = False,
        header: dict | None = None,
        metadata: dict | None = None,
        channel: str | None = None,
    ) -> dict:
        return self.session.send(
            stream, msg_or_type, content, self.get_parent(channel), ident, buffers, track, header, metadata
        )

    def _show(self, msg_type: str, content: dict) -> None:
        if self._outbox.parent is None:
            return
        if msg_type == "stream":
            self._outbox.stream("stderr" if content.get("name") == "stderr" else "stdout", str(content.get("text", "")))
        elif msg_type in SHOWN:
            kind = SHOWN[msg_type]
            if kind == P.Msg.ERROR:
                content = {
                    "ename": str(content.get("ename", "Error")),
                    "evalue": str(content.get("evalue", "")),
                    "traceback": list(content.get("traceback") or []),
                }
            self._reply(kind, dict(content))


def parent_of(request: P.Message | None, session: str) -> dict:
    """The running request as the Jupyter message it stands for (an ``execute_request``):
    what ``get_parent()`` returns in a kernel. Its ``msg_id`` is the request's own id, the
    id every output of the cell answers to."""
    if request is None:
        return {}
    header = {**_header("execute_request", session), "msg_id": request.id}
    return {
        "header": header,
        "msg_id": request.id,
        "msg_type": "execute_request",
        "parent_header": {},
        "metadata": {},
        "content": {},
    }
