"""What jupyter-gpu says about a cell (a cold start, a wait in the queue, a worker that was
replaced, values it lost), kept per thread (a background job's cell is its own) and shown
once, in the cell's cost line. A mixin of ``GPUMagics``."""

from __future__ import annotations

from typing import Any

from jupyter_gpu.commands import GPUCellError
from jupyter_gpu.output import image_text, show_note
from jupyter_gpu.status_line import StatusLine

MIN_WAIT_SHOWN_S = 0.05  # a shorter wait in the GPU queue is not worth a note


class CellNotes:
    _per_thread: Any
    _had_worker: bool
    _worker_image: Any
    _restored: Any  # SnapshotCommands'
    remote: Any

    @property
    def _notes(self) -> list[str] | None:
        """While a %%gpu cell runs (in this thread): what to say in its cost line."""
        return getattr(self._per_thread, "notes", None)

    @_notes.setter
    def _notes(self, value: list[str] | None) -> None:
        self._per_thread.notes = value

    @property
    def _queue_note(self) -> Any:
        """While a %%gpu cell (in this thread) waits for GPUs: its queue line."""
        return getattr(self._per_thread, "queue_note", None)

    @_queue_note.setter
    def _queue_note(self, value: Any) -> None:
        self._per_thread.queue_note = value

    def _note(self, text: str) -> None:
        """Say ``text`` in this cell's cost line (a note of its own outside a cell)."""
        if self._notes is None:
            show_note(text)
        else:
            self._notes.append(text)

    def _started(self, info: dict) -> None:
        """A new worker for this notebook: whatever the old one held is gone, unless it
        came back from a snapshot."""
        self.remote.reset()
        if info.get("restored") and self._restored(info["restored"]):
            pass
        elif info.get("previous") or self._had_worker:
            why = info.get("previous") or "the daemon no longer knows it"
            self._note(f"the previous worker is gone ({why}); its variables are lost")
        if info.get("waited_s", 0) >= MIN_WAIT_SHOWN_S:
            self._note(f"waited {info['waited_s']:.1f} s in the queue")
        self._note(f"{'cold' if info.get('cold') else 'warm'} start {info.get('start_s', 0):.2f} s")
        self._had_worker = True

    def _lacking(self, names: list[str], user_ns: dict, status: StatusLine) -> None:
        """The worker does not hold values this notebook thought it did (it was released,
        replaced or restarted since): send the notebook's own, or say which are gone."""
        lost, replaced = self.remote.lacking(names, user_ns)
        if lost:
            status.finish(None, failed=True)
        self._refuse_lost(lost)
        if replaced:
            self._note(
                f"the worker's own {', '.join(replaced)} went with its previous worker; this cell gets the "
                "notebook's value"
            )

    @staticmethod
    def _refuse_lost(lost: list[str]) -> None:
        if lost:
            raise GPUCellError(
                f"{', '.join(lost)} existed only on the remote worker, which is gone (it was released, replaced "
                "or stopped since): nothing ran. Run the cells that define them again; `%gpu pull NAME` keeps a "
                "copy in the notebook."
            )

    def _kept_image_note(self, wanted: str | None) -> None:
        """The cell asked for another image than the running worker's: the daemon keeps a
        running worker (and its namespace) rather than restart it, so say which image ran it."""
        ran = image_text(*self._worker_image) if self._worker_image else "the default image"
        want = f"image {wanted}" if wanted else "the default image"
        self._note(
            f"this cell ran on this session's running worker, which keeps {ran}; "
            f"`%gpu release` first to start one with {want}"
        )
