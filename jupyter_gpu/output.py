"""Remote output, re-published in the local cell as the same Jupyter messages, in order;
and the cost line that ends every cell."""

from __future__ import annotations

import getpass
import html
import sys
from typing import Any, Callable

from IPython import get_ipython
from IPython.display import clear_output, display

from kernel_worker import protocol as P
from kernel_worker.prices import limit_text


class RemoteResult:
    """The remote cell's last expression: returned by the magic so it shows as Out[n]."""

    def __init__(self, data: dict, metadata: dict):
        self.data, self.metadata = data, metadata

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return self.data.get("text/plain", "<remote result>")


class RemoteCellError(Exception):
    """Raised locally when the remote cell raised: IPython shows the remote traceback
    (``_render_traceback_``) and the cell is marked failed, as a local error would."""

    def __init__(self, ename: str, evalue: str, traceback: list[str]):
        super().__init__(evalue)
        self.ename, self.evalue, self.traceback = ename, evalue, traceback

    def _render_traceback_(self) -> list[str]:
        return self.traceback or [f"{self.ename}: {self.evalue}"]

    @classmethod
    def named(cls, ename: str, evalue: str, traceback: list[str]) -> "RemoteCellError":
        """An instance whose class is called like the remote exception (so the notebook
        records ``ZeroDivisionError``, not ``RemoteCellError``)."""
        if not ename.isidentifier():
            ename = "RemoteError"
        sub = type(ename, (cls,), {"__module__": "jupyter_gpu.remote"})
        return sub(ename, evalue, traceback)


SHOWN = frozenset({P.Msg.STREAM, P.Msg.DISPLAY, P.Msg.CLEAR, P.Msg.RESULT, P.Msg.ERROR})


class Relay:
    """Applies one cell's remote messages to the local output area. ``answer`` sends the
    reply to a remote input() (an INPUT_REPLY for the given request)."""

    def __init__(self, answer: Callable[[P.Message, dict], None] | None = None) -> None:
        self.result: RemoteResult | None = None
        self.error: RemoteCellError | None = None
        self.answer = answer
        # The cell's last output was clear_output(wait=True): locally its output stays, as
        # nothing follows; any output of ours now would set the pending clear off.
        self.clear_pending = False
        # Displays that came after the cell's Out[] (matplotlib's figure, flushed after the
        # last expression): shown after the notebook's own Out[] is, as locally (``show_deferred``).
        self.deferred: list[P.Message] = []
        # Output that came after the cell's error: a local cell shows it after the traceback
        # (IPython's warning after SystemExit), and here the traceback is raised at the end.
        self.after_error: list[P.Message] = []

    def __call__(self, msg: P.Message) -> None:
        c = msg.content
        t = msg.type
        if self.error is not None and t in (P.Msg.STREAM, P.Msg.DISPLAY, P.Msg.UPDATE_DISPLAY, P.Msg.CLEAR):
            self.after_error.append(msg)
            return
        if t in SHOWN:
            self.clear_pending = t == P.Msg.CLEAR and bool(c.get("wait"))
        if t == P.Msg.STREAM:
            out = sys.stderr if c.get("name") == "stderr" else sys.stdout
            out.write(c.get("text", ""))
            out.flush()
        elif t == P.Msg.DISPLAY and self.result is not None:
            self.deferred.append(msg)
        elif t in (P.Msg.DISPLAY, P.Msg.UPDATE_DISPLAY):
            sys.stdout.flush()
            sys.stderr.flush()
            transient = c.get("transient") or {}
            kw: dict = {"metadata": c.get("metadata") or {}, "raw": True}
            if transient.get("display_id"):
                kw["display_id"] = transient["display_id"]
            display(c.get("data", {}), update=(t == P.Msg.UPDATE_DISPLAY), **kw)
        elif t == P.Msg.CLEAR:
            clear_output(wait=bool(c.get("wait")))
        elif t == P.Msg.RESULT and (c.get("transient") or {}).get("display_id") and publish_result(c):
            pass  # a result the cell sent itself with a display id: published as such, updatable
        elif t == P.Msg.RESULT:
            self.result = RemoteResult(c.get("data", {}), c.get("metadata", {}))
        elif t == P.Msg.INPUT_REQUEST and self.answer is not None:
            self.answer(msg, ask(str(c.get("prompt", "")), bool(c.get("password"))))
        elif t == P.Msg.ERROR:
            self.error = RemoteCellError.named(
                str(c.get("ename", "Error")), str(c.get("evalue", "")), list(c.get("traceback") or [])
            )


def publish_result(c: dict) -> bool:
    """An execute_result a remote cell sent itself with a display id (through ipykernel's
    ``kernel.session.send``), published by this kernel as the same message, so a later
    update of that display id reaches it as it would locally. False without a kernel to
    publish it (a bare shell): then it is the cell's Out[]."""
    shell = get_ipython()
    hook = getattr(shell, "displayhook", None)
    session, socket = getattr(hook, "session", None), getattr(hook, "pub_socket", None)
    if session is None or socket is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    content = {
        "data": c.get("data", {}),
        "metadata": c.get("metadata", {}),
        "execution_count": shell.execution_count,
        "transient": {"display_id": str(c["transient"]["display_id"])},
    }
    session.send(socket, "execute_result", content, parent=hook.parent_header, ident=getattr(hook, "topic", None))
    return True


def show_deferred(relay: Relay, shell: Any = None, after_error: bool = False) -> None:
    """Show ``relay``'s deferred displays once this cell's Out[] is out (IPython publishes it
    after the magic returns, then runs post_run_cell); at once without ``shell``. With
    ``after_error``: what came after the cell's error, once its traceback is out."""
    if after_error:
        later, relay.after_error = relay.after_error, []
    else:
        later, relay.deferred = relay.deferred, []
    if not later:
        return

    def show(*_: Any) -> None:
        if shell is not None:
            shell.events.unregister("post_run_cell", show)
        replay = Relay()
        for m in later:
            replay(m)

    if shell is None:
        show()
    else:
        shell.events.register("post_run_cell", show)


def ask(prompt: str, password: bool) -> dict:
    """A remote input()'s question, asked here as a local cell would (the kernel's own
    input() is Jupyter's input_request); the content of the INPUT_REPLY."""
    sys.stdout.flush()
    try:
        return {"value": getpass.getpass(prompt) if password else input(prompt)}
    except Exception as e:  # StdinNotImplementedError in a headless run: the remote cell gets it
        return {"error": type(e).__name__, "message": str(e)}


def _bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _usd(x: float) -> str:
    return f"${x:.4f}" if x < 1 else f"${x:.2f}"


def device_label(info: dict) -> str:
    """``H100 ×2 (simulated)``, or ``cpu``: what a cost or status line ran on."""
    device, count = info.get("device", "cpu"), info.get("count", 0)
    return (f"{device} ×{count}" if count else device) + (" (simulated)" if info.get("simulated") else "")


def cost_parts(cost: dict, session: bool = True) -> list[str]:
    """The pieces of a cost line; ``session`` adds what the session has cost so far."""
    wall = cost.get("wall_s", 0.0)
    took = duration(wall)
    billed = cost.get("seconds", wall)
    if isinstance(billed, (int, float)) and duration(billed) != took:  # the host rounds as a cloud bills
        took += f" (billed {duration(billed)})"
    parts = [device_label(cost), took]
    money = _usd(cost.get("usd", 0.0)) + ("" if cost.get("price_per_hour") else " (no price set)")
    if cost.get("budget_usd"):
        money += f" of {limit_text(cost['budget_usd'])}"
    parts += [money, *readings(cost, "peak_memory_bytes", "mean_util")]
    for name, usd in (cost.get("compare") or {}).items():
        parts.append(f"{name} {_usd(usd)}")
    if session and cost.get("price_per_hour"):
        total = f"session {_usd(cost.get('session_usd', 0.0))}"
        if cost.get("session_idle_s", 0) >= 1:
            total += f" (warm idle {cost['session_idle_s']:.0f} s, {_usd(cost.get('session_idle_usd', 0.0))})"
        parts.append(total)
    if cost.get("stopped"):
        parts.append(f"stopped: {cost['stopped']}")
    return parts


def readings(r: dict, memory_key: str, util_key: str) -> list[str]:
    """GPU memory, utilisation and energy as a line shows them; a simulated GPU has none
    and says so rather than show a made-up number."""
    out = []
    if r.get(memory_key) is not None:
        out.append(f"peak {_bytes(r[memory_key])}" if memory_key.startswith("peak") else _memory(r))
    if r.get(util_key) is not None:
        out.append(f"util {r[util_key]:.0f}%")
    if r.get("energy_j") is not None:
        kwh = r["energy_j"] / 3.6e6
        out.append(f"{kwh:.2f} kWh" if kwh >= 0.01 else f"{kwh * 1000:.2f} Wh")
    if not out and r.get("simulated"):
        out.append("no reading")
    return out


def _memory(r: dict) -> str:
    return f"{_bytes(r['memory_used_bytes'])} / {_bytes(r.get('memory_bytes') or 0)}"


def duration(seconds: float) -> str:
    """``0.42 s``, ``14 min 02 s``, ``2 h 05 min``: as precise as a cell's length deserves."""
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


LINE_STYLE = (
    "color: var(--jp-ui-font-color2, #777); font-size: 0.85em; font-family: var(--jp-code-font-family, monospace);"
)


def line_bundle(text: str, kind: str) -> dict:
    """A quiet one-line display. The classes keep MathJax from typesetting "$1 · $2" as math."""
    classes = f"{kind} mathjax_ignore tex2jax_ignore"
    return {"text/plain": text, "text/html": f'<div class="{classes}" style="{LINE_STYLE}">{html.escape(text)}</div>'}


def image_text(image: str, origin: str) -> str:
    """``image NAME (from ORIGIN)``, as the ready note and the cost line show it."""
    return f"image {image} (from {origin})"


def _show_line(bundle: dict, meta: dict, handle: Any = None) -> None:
    """A line of jupyter-gpu's own: in place of ``handle`` (the cell's queue note) if any."""
    if handle is not None:
        handle.update(bundle, raw=True, metadata={"jupyter_gpu": meta})
    else:
        display(bundle, raw=True, metadata={"jupyter_gpu": meta})


def show_cost(cost: dict, image: str = "", notes: list[str] = (), handle: Any = None) -> None:  # type: ignore[assignment]
    """The cost line, as a display (not stdout) so it never mixes with the cell's text. It
    also carries what jupyter-gpu itself has to say about the cell (``notes``: a cold
    start, a replaced worker...), so a cell shows its own outputs plus this one line.
    ``image`` (``image NAME (from ORIGIN)``) names the image chosen for the worker, by the
    cell or by the notebook's metadata, so a notebook can never pick an image unseen."""
    text = "⏱ " + " · ".join([*cost_parts(cost), *notes, *([image] if image else [])])
    meta: dict = {"cost": cost, **({"image": image} if image else {}), **({"notes": list(notes)} if notes else {})}
    _show_line(line_bundle(text, "jupyter-gpu-cost"), meta, handle)


def show_notes(notes: list[str], handle: Any = None) -> None:
    """jupyter-gpu's notes on a cell that ended without a cost line, as one display line."""
    text = "[jupyter-gpu] " + " · ".join(notes)
    _show_line(line_bundle(text, "jupyter-gpu-note"), {"notes": list(notes)}, handle)


def attached_text(info: dict) -> str:
    """What `%gpu attach` found: which session, on what, doing what."""
    on = device_label(info)
    running = info.get("cell_running_s")
    if isinstance(running, (int, float)):
        doing = f"a cell running for {running:.0f} s: its output so far, then live"
    else:
        doing = f"{info.get('state', 'idle')}: its last cell's output follows"
    nb = f" of {info['notebook']}" if info.get("notebook") else ""
    return f"attached to session {info.get('session')}{nb} ({on}), {doing}"


def show_note(text: str) -> None:
    """A one-line status note from jupyter-gpu itself (queue place, cold start...)."""
    print(f"[jupyter-gpu] {text}", file=sys.stderr, flush=True)


def format_volumes(op: str, result: object) -> str:
    """What `%gpu volumes` and `jupyter gpu volumes` print."""
    if op == "create":
        return f"created volume {result['name']}"
    if op == "rm":
        return f"removed volume {result['removed']}"
    if not result:
        return "no volumes yet: `%%gpu ... --volume NAME:/path` creates one on first use"
    lines = []
    for v in result:
        size = f"  {_bytes(v['bytes'])}" if v.get("bytes", -1) >= 0 else ""
        used = f"  mounted by {', '.join(u[:8] for u in v['in_use_by'])}" if v["in_use_by"] else ""
        lines.append(f"{v['name']}{size}{used}")
    return "\n".join(lines)


def format_status(st: dict, mine: str) -> str:
    """``%gpu status``: the host's GPUs, this user's sessions, the warm pool and the queue;
    ``mine`` is this notebook's session id."""
    lines = [f"backend: {st['backend']}"]
    for g in st["gpus"]:
        holder = g["session"] or ("warm pool" if g.get("warm") else f"held by {g['user']}" if g["user"] else "free")
        this = " (this notebook)" if g["session"] == mine else ""
        sim = " simulated" if g["simulated"] else ""
        lines.append(f"  GPU {g['index']}: {g['model']}{sim}  {g['memory_bytes'] / 1024**3:.0f} GiB  {holder}{this}")
    for s in st["sessions"]:
        this = " (this notebook)" if s["id"] == mine else ""
        left = f"; its kernel is gone: `%gpu attach {s['id']}`" if s.get("detached") else ""
        lines.append(
            f"  session {s['id'][:8]}{this}: {s['device']} {s['state']}, held {s['held_s']:.0f} s, "
            f"${s['usd']:.4f}{left}"
        )
    for w in st.get("warm", []):
        waiting = f"waiting {w['idle_s']:.0f} s, ${w['usd']:.4f} of idle time"
        lines.append(f"  warm pool: {w['device']} {w['state']}, {waiting}")
    for i, q in enumerate(st["queue"], 1):
        whose = q["session"][:8] if q["session"] else f"{q.get('user') or 'another user'}'s"  # others' ids are hidden
        lines.append(f"  queued {i}: {whose} wants {q['request']}")
    return "\n".join(lines)


def format_cost(c: dict) -> str:
    """``%gpu cost``: each cell's cost line, then the session's total."""
    cells = [x for x in c["cells"] if x.get("kind") == "cell"]
    lines = [f"  cell {i}: " + " · ".join(cost_parts(cell, session=False)) for i, cell in enumerate(cells, 1)]
    lines += [f"  {r['kind']}: {r['seconds']:.2f} s, {_usd(r['usd'])}" for r in c.get("snapshots", [])]
    lines.append(
        f"cells: {len(cells)}, ${c['cells_usd']:.4f} of GPU time; "
        f"session total (warm idle included): ${c['total_usd']:.4f}"
    )
    return "\n".join(lines)
