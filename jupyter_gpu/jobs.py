"""Background cells: ``%%gpu ... --background`` returns at once and its cell runs on in a
thread of the kernel, with its own socket to the daemon, while the notebook runs other
cells. Its output goes on arriving in its own cell's output area: an ipywidgets
``Output`` there (the documented way for a thread to write into a cell) where a frontend
renders widgets, else a display updated in place.

A ``%%gpu`` cell for the same session waits for the job first (one cell at a time runs on
a worker), saying so. ``%gpu jobs`` lists them, ``%gpu wait [JOB]`` waits (and shows the
output so far), ``%gpu cancel JOB`` interrupts it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from IPython.display import display

from jupyter_gpu import notebook
from jupyter_gpu.commands import GPUCellError
from jupyter_gpu.output import Relay, RemoteCellError, cost_parts, line_bundle, show_note
from jupyter_gpu.status_line import status_widgets
from kernel_worker import protocol as P

LIVE_UPDATE_S = 0.2  # a display updated in place is redrawn at most this often
WAIT_POLL_S = 0.1  # `%gpu wait` shows a job's new output this often
# A background cell's input() / getpass(): nobody is there to type (the notebook runs other
# cells), so the remote cell gets at once what Jupyter gives a frontend without stdin.
NO_STDIN = {
    "error": "StdinNotImplementedError",
    "message": "raw_input was called, but this frontend does not support input requests: a background cell "
    "(%%gpu --background) cannot ask the notebook's user; run the cell without --background to answer input()",
}


class JobOutput(Relay):
    """The job cell's output area, written from the job's thread."""

    def __init__(self, header: str, widgets: bool):
        super().__init__()
        self.text = ""
        self.rich: list[dict] = []
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._widget: Any = None
        if widgets:
            import ipywidgets

            self._widget = ipywidgets.Output()
            display(self._widget)
        self._handle = display(line_bundle(header, "jupyter-gpu-job"), raw=True, display_id=True)
        # Made here, in the cell: a display made from the job's thread would land in whatever
        # cell runs then.
        self._text_handle = None if widgets else display({"text/plain": ""}, raw=True, display_id=True)

    def note(self, text: str) -> None:
        self._handle.update(line_bundle(text, "jupyter-gpu-job"), raw=True)

    def __call__(self, msg: Any) -> None:
        c = msg.content
        if msg.type == P.Msg.STREAM:
            self._stream(str(c.get("name", "stdout")), str(c.get("text", "")))
        elif msg.type in (P.Msg.DISPLAY, P.Msg.RESULT):
            self._rich(c.get("data") or {})
            if msg.type == P.Msg.RESULT:
                super().__call__(msg)
        elif msg.type == P.Msg.INPUT_REQUEST and self.answer is not None:
            self.answer(msg, NO_STDIN)
        elif msg.type == P.Msg.ERROR:
            super().__call__(msg)
            self._stream("stderr", "\n".join(self.error._render_traceback_()) + "\n", keep=False)

    def _stream(self, name: str, text: str, keep: bool = True) -> None:
        """``keep``: part of the text `%gpu wait` prints (not a traceback it raises anew)."""
        with self._lock:
            self.text += text if keep else ""
        if self._widget is not None:
            (self._widget.append_stderr if name == "stderr" else self._widget.append_stdout)(text)
        else:
            self._draw(force=False)

    def _rich(self, data: dict) -> None:
        with self._lock:
            self.rich.append(data)
        if self._widget is not None:
            self._widget.append_display_data(_Raw(data))
        else:
            self._draw(force=True)

    def _draw(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < LIVE_UPDATE_S:
            return
        self._last_draw = now
        with self._lock:
            bundle = {"text/plain": self.text, **{k: v for d in self.rich for k, v in d.items() if k != "text/plain"}}
        self._text_handle.update(bundle, raw=True)

    def flush(self) -> None:
        if self._widget is None and (self.text or self.rich):
            self._draw(force=True)


class _Raw:
    """A mimebundle the Output widget shows as it is."""

    def __init__(self, data: dict):
        self.data = data

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return self.data


class Job:
    def __init__(self, number: int, session: str, spec: str, output: JobOutput):
        self.number, self.session, self.spec, self.output = number, session, spec, output
        self.state = "running"  # running | done | failed
        self.started = time.monotonic()
        self.ended = 0.0
        self.cost: dict | None = None
        self.error = ""
        self.notes: list[str] = []  # what jupyter-gpu said about it: its last line carries them
        self.cancelled = False
        self.done = threading.Event()

    def line(self) -> str:
        took = (self.ended or time.monotonic()) - self.started
        what = f"job {self.number}: {self.spec} {self.state}, {took:.1f} s"
        if self.cost:
            what += " · " + " · ".join(cost_parts(self.cost, session=False))
        return what + "".join(f" · {n}" for n in self.notes) + (f" ({self.error})" if self.error else "")


class Jobs:
    """This kernel's background cells, by number."""

    def __init__(self) -> None:
        self.all: dict[int, Job] = {}

    @property
    def next_number(self) -> int:
        """The number the next job gets (the last one's is one less)."""
        return len(self.all) + 1

    def start(self, session: str, spec: str, output: JobOutput, body: Callable[[Job], Any]) -> Job:
        job = Job(self.next_number, session, spec, output)
        self.all[job.number] = job

        def run() -> None:
            try:
                body(job)
                job.state = "failed" if output.error is not None else "done"
            except BaseException as e:  # the job's own cell error: shown in its output area
                job.state, job.error = "failed", str(e)[:300]
            finally:
                job.state = "cancelled" if job.cancelled else job.state
                job.ended = time.monotonic()
                output.flush()
                output.note("⏱ " + job.line())
                job.done.set()

        threading.Thread(target=run, name=f"jupyter-gpu-job-{job.number}", daemon=True).start()
        return job

    def running_on(self, session: str) -> list[Job]:
        return [j for j in self.all.values() if j.session == session and not j.done.is_set()]

    def get(self, number: str) -> Job:
        try:
            return self.all[int(number.strip().lstrip("#"))]
        except (ValueError, KeyError):
            known = ", ".join(str(n) for n in self.all) or "none yet"
            raise LookupError(f"no background job {number.strip()!r} in this notebook (jobs: {known})") from None


def raise_job_error(job: Job) -> None:
    """After waiting on a job: its remote exception, as a local cell would show it."""
    e = job.output.error
    if e is not None:
        raise RemoteCellError.named(e.ename, e.evalue, e.traceback)


class BackgroundCells:
    """``%%gpu --background`` and ``%gpu jobs / wait / cancel``: a mixin of ``GPUMagics``."""

    jobs: Jobs
    session_id: str
    background: str
    default_gpu: str
    status_line: str
    client: Any
    _notes: Any
    _queue_note: Any

    def _cell(self, args: Any, cell: str, job: Job | None = None, client: Any = None) -> Any:
        raise NotImplementedError

    def _keep_alive(self, session: str) -> None:
        raise NotImplementedError

    def _after_jobs(self) -> None:
        """One cell at a time runs on a worker: a cell for a session with a background
        job waits for it, saying so."""
        for job in self.jobs.running_on(self.session_id):
            show_note(f"waiting for background job {job.number} to finish first (`%gpu cancel {job.number}` stops it)")
            job.done.wait()

    def _detach(self) -> bool:
        """Whether --background may return at once: not in a headless run (nbconvert,
        papermill), which would end before the job's output came."""
        if self.background == "auto":
            return bool(os.environ.get(notebook.ENV_SESSION_NAME))
        return self.background == "detach"

    def _start_job(self, args: Any, cell: str) -> None:
        spec = args.spec or self.default_gpu
        number = self.jobs.next_number
        out = JobOutput(
            f"[jupyter-gpu] job {number} running in the background on {spec}: its output follows here; "
            f"`%gpu wait {number}`, `%gpu cancel {number}`",
            widgets=self.status_line != "off" and status_widgets(self.status_line),
        )
        self._keep_alive(self.session_id)
        client = self.client.twin()
        session = self.session_id
        out.answer = lambda question, content: client.send(
            P.Message(P.Msg.INPUT_REPLY, content, session, parent=question.id)
        )

        def body(job: Job) -> None:
            self._notes, self._queue_note = [], None
            try:
                self._cell(args, cell, job=job, client=client)
            finally:
                client.close()
                job.notes = self._notes or []

        self.jobs.start(self.session_id, spec, out, body)

    def _jobs(self, _: str) -> None:
        print("\n".join(j.line() for j in self.jobs.all.values()) or "no background jobs in this notebook")

    def _job(self, rest: str) -> Any:
        try:
            return self.jobs.get(rest)
        except LookupError as e:
            raise GPUCellError(str(e)) from None

    def _wait(self, rest: str) -> Any:
        """Wait for a background job (the last one by default): its output so far, then
        the rest as it comes; its remote error, if it failed, is this cell's."""
        job = self._job(rest or str(self.jobs.next_number - 1))
        shown = 0
        while True:
            ended = job.done.wait(WAIT_POLL_S)
            text = job.output.text
            if len(text) > shown:
                print(text[shown:], end="", flush=True)
                shown = len(text)
            if ended:
                break
        print(job.line())
        raise_job_error(job)
        return job.output.result

    def _cancel(self, rest: str) -> None:
        job = self._job(rest)
        if job.done.is_set():
            print(f"job {job.number} already {job.state}")
            return
        job.cancelled = True
        self.client.send(P.Message(P.Msg.INTERRUPT, {}, job.session))
        job.done.wait()
        print(job.line())
