"""The frontend's part in ipywidgets' ``Output`` widget, for widgets made on the worker.

A widget made in a remote cell has no frontend: its comm reaches nobody (``comm``'s
default comm, which sends nothing). An ``Output`` widget, though, changes what the cell
shows: ``with out:`` sets the widget's ``msg_id`` to the running request's, and a
frontend (JupyterLab, nbclient) then puts every output of that request into the widget
instead of the cell, until ``msg_id`` is cleared; a ``clear_output`` clears the widget.
Here the worker plays that part: the outputs go into the widget's ``outputs`` (synced back
to the widget as a frontend syncs them), not into the cell, exactly as nbclient does it
(``nbclient.output_widget``). Display updates by id are not captured (they update the
display wherever it is, as in nbclient)."""

from __future__ import annotations

import sys
import threading
from typing import Any

from kernel_worker import protocol as P
from kernel_worker.executor.outbox import Outbox

OUTPUT_MODEL = ("@jupyter-widgets/output", "OutputModel")
CAPTURED = frozenset({P.Msg.STREAM, P.Msg.DISPLAY, P.Msg.RESULT, P.Msg.ERROR, P.Msg.CLEAR})


def _output(kind: str, content: dict) -> dict:
    """The nbformat output a captured message becomes."""
    if kind == P.Msg.STREAM:
        return {"output_type": "stream", "name": content.get("name", "stdout"), "text": content.get("text", "")}
    if kind == P.Msg.ERROR:
        return {
            "output_type": "error",
            "ename": content.get("ename", ""),
            "evalue": content.get("evalue", ""),
            "traceback": list(content.get("traceback") or []),
        }
    out = {"output_type": kind, "data": content.get("data", {}), "metadata": content.get("metadata", {})}
    if kind == P.Msg.RESULT:
        out["execution_count"] = content.get("execution_count")
    return out


class OutputCapture:
    """Output widgets' capture on the worker: a stack of capturing widgets per request id
    (the innermost ``with`` takes the output), fed by the outbox's ``divert``."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self._hooks: dict[str, list[Any]] = {}
        self._lock = threading.RLock()

    def install(self) -> bool:
        """Make ``comm.create_comm`` give comms that play the frontend's part; False when
        the image has no ``comm`` package (and so no ipywidgets 8)."""
        try:
            import comm
            from comm.base_comm import BaseComm
        except ImportError:
            return False
        capture = self

        class WorkerComm(BaseComm):
            """A comm with nobody at the other end, except for an Output widget's
            ``msg_id`` and ``outputs``, which the worker keeps as a frontend would."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.output_widget = False
                self.msg_id = ""
                self.outputs: list[dict] = []
                self.clear_next = False
                super().__init__(*args, **kwargs)

            def publish_msg(self, msg_type: str, data: Any = None, metadata: Any = None, buffers: Any = None, **keys):
                state = data.get("state") if isinstance(data, dict) else None
                if not isinstance(state, dict):
                    return
                if msg_type == "comm_open":
                    self.output_widget = (state.get("_model_module"), state.get("_model_name")) == OUTPUT_MODEL
                if not self.output_widget:
                    return
                if isinstance(state.get("outputs"), (list, tuple)):
                    self.outputs = [dict(o) for o in state["outputs"] if isinstance(o, dict)]
                if "msg_id" in state and msg_type != "comm_close":
                    capture.hook(self, str(state["msg_id"] or ""))

        def create_comm(*args: Any, **kwargs: Any) -> BaseComm:
            return WorkerComm(*args, **kwargs)

        comm.create_comm = create_comm
        return True

    def hook(self, widget: Any, msg_id: str) -> None:
        """``widget`` now captures ``msg_id``'s output ("": none), as nbclient's
        ``register_output_hook`` / ``remove_output_hook``."""
        with self._lock:
            hooks = {k: list(v) for k, v in self._hooks.items()}  # replaced whole: take() reads it unlocked
            old = hooks.get(widget.msg_id, [])
            if widget in old:
                del old[len(old) - 1 - old[::-1].index(widget)]  # the innermost: nbclient pops its stack
            if msg_id:
                hooks.setdefault(msg_id, []).append(widget)
            widget.msg_id = msg_id
            self._hooks = {k: v for k, v in hooks.items() if v}
            self.outbox.divert = self.take if self._hooks else None

    def take(self, kind: str, content: dict) -> bool:
        """Whether a widget took this output of the running request (else the cell shows it)."""
        parent = self.outbox.parent
        if kind not in CAPTURED or parent is None or parent.id not in self._hooks:
            return False  # the usual case, even with a widget left capturing an earlier cell
        with self._lock:
            hooks = self._hooks.get(parent.id)
            if not hooks:
                return False
            widget = hooks[-1]
            try:
                self._add(widget, kind, content)
            except Exception as e:  # noqa: BLE001  never lose the output: the cell shows it instead
                print(f"jupyter-gpu executor: an Output widget could not take output: {e!r}", file=sys.__stderr__)
                return False
            return True

    def _add(self, widget: Any, kind: str, content: dict) -> None:
        if kind == P.Msg.CLEAR:
            if content.get("wait"):
                widget.clear_next = True
                return
            widget.outputs = []
        else:
            if widget.clear_next:
                widget.outputs, widget.clear_next = [], False
            out = _output(kind, content)
            last = widget.outputs[-1] if widget.outputs else None
            if last and out["output_type"] == last.get("output_type") == "stream" and last.get("name") == out["name"]:
                widget.outputs[-1] = {**last, "text": last.get("text", "") + out["text"]}
            else:
                widget.outputs.append(out)
        self._sync(widget)

    @staticmethod
    def _sync(widget: Any) -> None:
        """The widget's ``outputs``, sent back to it as a frontend's update (not through
        ``handle_msg``, which would fire the shell's execute events mid-cell)."""
        callback = widget._msg_callback
        if callback is None:
            return
        data = {"method": "update", "state": {"outputs": list(widget.outputs)}, "buffer_paths": []}
        callback({"content": {"comm_id": widget.comm_id, "data": data}, "buffers": [], "metadata": {}})
