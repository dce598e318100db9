"""``%%gpu`` and ``%gpu``: run a cell on a warm remote worker, manage its session."""

from __future__ import annotations

import atexit
import functools
import os
import platform
import threading
import uuid
from typing import Any

import cloudpickle
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Dict, Enum, Float, Unicode, observe

from jupyter_gpu import connect, notebook
from jupyter_gpu.cell_notes import CellNotes
from jupyter_gpu.client import DaemonClient, DaemonError, DaemonLost
from jupyter_gpu.closure import RemoteNamespace, names_read
from jupyter_gpu.commands import Commands, GPUCellError, names_in
from jupyter_gpu.imports import imports_of
from jupyter_gpu.jobs import BackgroundCells, Job, Jobs
from jupyter_gpu.keepalive import Keepalive
from jupyter_gpu.notebook import IMAGE_FROM_METADATA, cell_image
from jupyter_gpu.output import Relay, image_text, show_cost, show_deferred, show_note, show_notes
from jupyter_gpu.snapshot_commands import SnapshotCommands
from jupyter_gpu.status_line import MODES, StatusLine
from jupyter_gpu.workdir import WorkdirSync
from jupyter_gpu.workdir_wire import WorkdirWire, WorkspaceCells
from kernel_worker import bulk, serialize
from kernel_worker import protocol as P

CLIENT_VERSIONS = {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__}


@magics_class
class GPUMagics(Commands, SnapshotCommands, CellNotes, WorkspaceCells, BackgroundCells, Magics, connect.DaemonTarget):
    default_gpu = Unicode("any", help="GPU request used when a %%gpu cell names none (H100, A100:2, any, cpu...).").tag(
        config=True
    )
    show_cost = Bool(True, help="End each %%gpu cell with its cost line.").tag(config=True)
    status_line = Enum(
        MODES,
        "auto",
        help="The live line under a running cell (elapsed, dollars so far, GPU readings): auto (a widget in "
        "Jupyter Server frontends with ipywidgets, else an updated display), widget, html, off.",
    ).tag(config=True)
    release_on_exit = Bool(True, help="Release this kernel's session (and its GPUs) when the kernel exits.").tag(
        config=True
    )
    background = Enum(
        ("auto", "detach", "foreground"),
        "auto",
        help="What %%gpu --background does: detach (return at once, output goes on arriving in the cell), "
        "foreground (wait, as without it), or auto: detach where a Jupyter Server frontend shows the cell, "
        "foreground in a headless run (nbconvert, papermill), which would end before the job's output came.",
    ).tag(config=True)
    sync_workdir = Bool(
        True,
        help="Where the worker cannot work in the notebook's own directory (a daemon on another host or as another "
        "user, or the docker backend), sync that directory to a per-user workspace on the daemon's host before each "
        "cell and run the cell there (only changed files travel; c.WorkdirSync sets excludes and limits). "
        "%%gpu --no-sync turns it off for one cell.",
    ).tag(config=True)
    default_budget = Float(
        0.0, help="USD a %%gpu cell may spend before the daemon interrupts it, if it gives no --budget (0: none)."
    ).tag(config=True)
    budgets = Dict(
        {},
        help="Your own spending limits, lower than the host's: notebook_per_day, user_per_day, user_per_month (USD). "
        "The daemon enforces them as the operator's c.Budgets.*: a cell past one is refused or interrupted.",
    ).tag(config=True)
    keepalive_interval = Float(
        10.0,
        help="Seconds between the kernel's keepalive pings while it has a session; a kernel silent past the daemon's "
        "client_timeout is taken for gone (its session is detached, then released after orphan_grace).",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kw: Any):
        Magics.__init__(self, shell=shell)
        connect.DaemonTarget.__init__(self, config=shell.config if shell is not None else None, **kw)
        self.session_id = uuid.uuid4().hex
        self.remote = RemoteNamespace()
        self._had_worker = False  # a worker was started for this notebook before
        self._notebook = ""  # this kernel's notebook, for spend per notebook
        self._worker_image: tuple[str, str] | None = None  # (image, origin) the current worker started with
        self._per_thread = threading.local()  # a background job's cell state is its own thread's
        self.jobs = Jobs()
        self.workdir = WorkdirWire(WorkdirSync(parent=self))  # c.WorkdirSync.*: excludes, limits
        if shell is not None:  # so `%config WorkdirSync.max_file_bytes = ...` reaches it
            shell.configurables.append(self.workdir.sync)
        self._keepalive: Keepalive | None = None
        self._kept: tuple = (None, "")  # (client, session) the keepalive follows
        atexit.register(self._at_exit)

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> DaemonClient:
        try:
            fresh = self._client is None
            client = self.connected()
        except (connect.TargetError, DaemonError) as e:
            raise GPUCellError(str(e)) from None
        if fresh:  # exit handlers run last-in first-out: the release must go before the tunnel closes
            atexit.unregister(self._at_exit)
            atexit.register(self._at_exit)
        return client

    def _drop_client(self) -> None:
        self.disconnect()
        self._keep_alive("")

    @observe("keepalive_interval")
    def _new_interval(self, change: dict) -> None:
        if getattr(self, "_keepalive", None) is not None:
            self._keepalive.interval = change["new"]

    def _keep_alive(self, session: str) -> None:
        """Keepalive pings for ``session`` ("" for none) through the current client."""
        client = self._client if session else None
        if (client, session) == self._kept:
            return
        self._kept = (client, session)
        if self._keepalive is not None:
            self._keepalive.follow(client, session)  # a thread told to follow nothing ends
        self._keepalive = None
        if client is not None:
            self._keepalive = Keepalive(self.keepalive_interval)
            self._keepalive.follow(client, session)
            self._keepalive.start()

    def _bulk_dir(self) -> str | None:
        """This session's directory for bulk buffers, when the daemon shares our host."""
        root = self.client.bulk_root()
        if root is None:
            return None
        path = os.path.join(root, self.session_id)
        os.makedirs(path, mode=0o700, exist_ok=True)  # every time: the daemon removes it on each release
        return path

    @functools.lru_cache(maxsize=64)  # noqa: B019 -- one instance per kernel; the same lines recur
    def _args(self, line: str) -> Any:
        return parse_argstring(self.gpu_cell, line)

    def _request(self, msg: P.Message, on_message: Any = None, client: DaemonClient | None = None) -> P.Message:
        """Send ``msg`` (through ``client``: a background job's own); Ctrl-C interrupts the
        remote side; errors become GPUCellError."""

        def interrupt() -> None:
            show_note("interrupting the remote cell (press again to stop waiting)")
            self.client.send(P.Message(P.Msg.INTERRUPT, {}, self.session_id))

        try:
            return (client or self.client).request(msg, on_message, interrupt)
        except DaemonLost as e:
            if client is None:
                self._drop_client()
            raise GPUCellError(str(e)) from None
        except DaemonError as e:
            if e.code in (P.Err.WORKER_DIED, P.Err.TIMEOUT, P.Err.RELEASED, P.Err.SHUTDOWN):
                self.remote.reset()
            raise GPUCellError(str(e)) from None

    # ------------------------------------------------------------------ %%gpu

    @magic_arguments()
    @argument("spec", nargs="?", default=None, help="GPU request: H100, H100:2, A100-80GB, 'H100|A100', any, cpu.")
    @argument("--pull", default="", help="Comma-separated names to bring back into the notebook after the cell.")
    @argument(
        "--timeout",
        type=float,
        default=None,
        help="Interrupt the cell after this many seconds (killed if it ignores it).",
    )
    @argument("--budget", type=float, default=None, help="Interrupt the cell when it has cost this many USD.")
    @argument("--no-wait", action="store_true", help="Fail at once instead of queueing when no such GPU is free.")
    @argument("--image", default=None, help="Container image for this session (docker backend).")
    @argument("--volume", action="append", default=[], help="NAME:/path[:ro] volume to mount (docker backend).")
    @argument(
        "--background",
        action="store_true",
        help="Return at once; the cell runs on, its output arriving in this cell (%%gpu jobs / wait / cancel).",
    )
    @argument("--no-sync", action="store_true", help="Do not sync the notebook's directory to the worker.")
    @argument("--fresh", action="store_true", help="A new worker starts empty, not from the notebook's snapshot.")
    @argument(
        "--fetch",
        action="append",
        default=[],
        help="After the cell, bring this file, directory or glob back from the synced workspace (repeatable).",
    )
    @cell_magic("gpu")
    def gpu_cell(self, line: str, cell: str) -> Any:
        """Run this cell on a warm remote worker with a GPU.

        The names the cell reads travel with it; variables it makes stay on the worker
        (``--pull`` or ``%gpu pull`` brings them back). Output streams back as it happens,
        and the cell ends with its cost.
        """
        args = self._args(line)
        self._after_jobs()
        if args.background and self._detach():
            return self._start_job(args, cell)
        self._notes = []  # what jupyter-gpu says about this cell: shown once, at its end
        self._queue_note = None  # the cell's "waiting in the queue" line, which becomes that one line
        if args.background:
            self._notes.append("a headless run: ran in the foreground, so none of its output is lost")
        try:
            return self._cell(args, cell)
        finally:
            notes, self._notes = self._notes, None
            if notes:  # the cell ended without a cost line to carry them
                show_notes(notes, self._queue_note)

    def _cell(self, args: Any, cell: str, job: Job | None = None, client: DaemonClient | None = None) -> Any:
        try:
            chosen = notebook.settings(cell)  # the notebook's jupyter_gpu metadata (the Lab sidebar's choice)
        except notebook.SettingsError as e:
            if not args.spec:
                raise GPUCellError(f"{e}. Nothing was run.") from None
            chosen = {}  # the cell names its GPU; unreadable metadata cannot matter
        spec = args.spec or chosen.get("gpu") or self.default_gpu
        image, image_from = cell_image(args.image, args.spec, chosen)
        self._notebook = self._notebook or notebook.display_name(cell)
        pull = names_in(args.pull)
        user_ns = self.shell.user_ns
        reads = names_read(cell, self.shell.transform_cell)
        self._refuse_lost(self.remote.lost(reads, user_ns))
        content: dict = {
            "gpu": spec,
            "code": cell,
            "pull": pull,
            "timeout": args.timeout,
            "budget": args.budget or self.default_budget or None,
            "budgets": self.budgets,
            "fresh": args.fresh,
            "no_wait": args.no_wait,
            "image": image,
            "volumes": args.volume or chosen.get("volumes", []),
            "client_versions": CLIENT_VERSIONS,
            "notebook": self._notebook,
            "keepalive": self.keepalive_interval,  # this kernel pings while it lives: a silence means it died
        }
        imports = imports_of(cell, self.shell.transform_cell)  # the worker stops the cell if it lacks one
        if imports:
            content["imports"] = imports
        directory = self._bulk_dir()
        content["bulk_ok"] = directory is not None
        workspace = self._sync_for_cell(args, directory, client)  # the notebook's directory, where needed
        if workspace is not None:  # the daemon runs the cell in its synced copy
            content["workspace"] = workspace
        elif directory is not None:  # the worker shares this host and user: it works where the notebook does
            content["cwd"] = os.getcwd()
        relay = job.output if job is not None else Relay(answer=self._answer_input)
        started = False
        status = StatusLine("off" if job is not None else self.status_line)
        self._keep_alive(self.session_id)

        def on_message(m: P.Message) -> None:
            nonlocal started
            if m.type == P.Msg.PROGRESS:
                status.update(m.content)
            elif m.type == P.Msg.QUEUED:
                text = f"[jupyter-gpu] waiting for {m.content.get('request')}: {m.content.get('where')}"
                if job is not None:
                    job.output.note(text)
                elif self._queue_note is None:
                    self._queue_note = display({"text/plain": text}, raw=True, display_id=True)
                    status.take(self._queue_note.display_id)  # the cell's one line: queue, then status, then cost
                else:
                    self._queue_note.update({"text/plain": text}, raw=True)
            elif m.type == P.Msg.STARTED:
                started = True
                self._worker_image = (image, image_from) if image else None
                self._started(m.content)
            else:
                relay(m)

        for _ in range(2):  # once more if the worker lacks what this notebook thought it held
            try:
                specs, frames, prints, content["assumed"] = self.remote.to_ship(reads, user_ns)
            except serialize.SerializationError as e:
                raise GPUCellError(f"{e} Nothing was run.") from None
            content["values"] = specs
            if directory is not None:
                frames, content["bulk"] = bulk.offload(frames, directory)
            try:
                reply = self._request(
                    P.Message(P.Msg.EXECUTE, content, self.session_id, buffers=frames), on_message, client
                )
            except BaseException as e:
                status.finish(None, failed=True)
                if directory is not None:
                    bulk.discard(content.get("bulk") or {}, directory)
                if isinstance(e, GPUCellError) and not started and image_from == IMAGE_FROM_METADATA:
                    if "image" in str(e):
                        raise GPUCellError(f"{e} (the image {image!r} came from {IMAGE_FROM_METADATA})") from None
                raise
            if reply.type != P.Msg.NEED:
                break
            self.remote.shipped_ok(prints)
            self._lacking(reply.content.get("names") or [], user_ns, status)
        else:
            status.finish(None, failed=True)
            raise GPUCellError("the worker lost this notebook's values again while they were being sent; nothing ran")
        done = reply.content
        cost_line = job is None and self.show_cost and bool(done.get("cost")) and not relay.clear_pending
        if not cost_line:  # else the cost line replaces the status line
            status.finish(done.get("cost"), failed=relay.error is not None)
        if relay.clear_pending:  # nothing new may follow a trailing clear_output(wait=True), notes neither
            self._notes = []
        for text in done.get("import_notes") or []:  # a module in another version on the worker
            self._note(text)
        if done.get("loaded"):
            self.remote.shipped_ok(prints)
        self.remote.after_cell(done.get("bound", []), done.get("deleted", []), user_ns)
        if done.get("values"):
            values = serialize.receive_values(reply.content, reply.buffers, directory or "")
            user_ns.update(values)
            for name in values:
                self.remote.pulled(name, user_ns)
        if done.get("exit"):  # after the bookkeeping above: what the worker held, it no longer does
            self.remote.reset()
            self._note(
                "the cell called exit() or raised SystemExit: its worker ended and the session was released, as "
                "a kernel restart would; the next %%gpu cell starts a fresh worker"
            )
        self._after_sync_cell(args, workspace, done, client)
        if not started and (self._worker_image or (None, ""))[0] != image:
            self._kept_image_note(image)
        if job is not None:
            job.cost = done.get("cost")
        elif cost_line:
            notes, self._notes = self._notes or [], []
            shown = image_text(*self._worker_image) if self._worker_image else ""
            show_cost(done["cost"], shown, notes, status.handle() or self._queue_note)
            status.close()
        if relay.error is not None:
            show_deferred(relay)  # no Out[] comes: now
            show_deferred(relay, self.shell, after_error=True)  # after the traceback
            raise relay.error
        show_deferred(relay, self.shell)
        return relay.result

    def _answer_input(self, question: P.Message, content: dict) -> None:
        """What the user typed at the remote cell's input() (asked here, as a local cell would)."""
        self.client.send(P.Message(P.Msg.INPUT_REPLY, content, self.session_id, parent=question.id))

    # ------------------------------------------------------------------ %gpu

    @line_magic("gpu")
    def gpu_line(self, line: str) -> Any:
        """Manage this notebook's remote session.

        %gpu status          GPUs of the host, sessions, queue
        %gpu release [--keep]  stop this notebook's worker now and free its GPUs (--keep: snapshot it first)
        %gpu snapshot / snapshots / restore [ID]  the namespace's snapshots (taken on idle release)
        %gpu pull a,b        copy worker variables into the notebook
        %gpu push a,b        send notebook variables to the worker
        %gpu cost [--plot]   this session's cells and total spend; --plot: per cell and per day, inline
        %gpu attach [SESSION]  take over a session a kernel left (its running cell's output, then live)
        %gpu pip install SPEC...  packages for every worker of yours (installed on the daemon's host)
        %gpu jobs            this notebook's background cells (%%gpu ... --background)
        %gpu wait [JOB]      wait for one (the last by default), showing its output
        %gpu cancel JOB      interrupt one
        %gpu volumes [ls | du | create NAME | rm NAME]   your volumes (docker backend)
        %gpu fetch PATH...   files cells wrote in the synced workspace, into the notebook's directory
        %gpu connect ssh://user@host[:port] [--key F] [--known-hosts F] [--accept-new-host]
        %gpu connect tcp://host:port --server-key KEY [--client-key PATH]   (CurveZMQ)
        %gpu connect local   back to the daemon on this machine
        """
        cmd, _, rest = line.strip().partition(" ")
        handlers = {
            "status": self._status,
            "release": self._release,
            "pull": self._pull,
            "push": self._push,
            "cost": self._cost,
            "volumes": self._volumes,
            "connect": self._connect,
            "attach": self._attach,
            "pip": self._pip,
            "jobs": self._jobs,
            "wait": self._wait,
            "cancel": self._cancel,
            "fetch": self._fetch,
            "snapshot": self._snapshot,
            "snapshots": self._snapshots,
            "restore": self._restore,
        }
        if cmd not in handlers:
            raise GPUCellError(f"unknown %gpu command {cmd!r}; use one of: {', '.join(handlers)}")
        return handlers[cmd](rest.strip())

    def _at_exit(self) -> None:
        if self._client is None or not self.release_on_exit:
            return
        try:
            self._client.call(P.Msg.RELEASE, session=self.session_id, timeout=2.0)
        except Exception:
            pass
