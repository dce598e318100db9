"""``%gpu snapshot``, ``%gpu snapshots``, ``%gpu restore [ID]``, and what a cell says when
its new worker started from a snapshot. A mixin of ``GPUMagics``.

The daemon snapshots a notebook's namespace on idle release (and ``%gpu release
--keep``) and restores it into the notebook's next worker, so these are for the cases in
between: a snapshot now (before something risky), the list, an older one back."""

from __future__ import annotations

import datetime
from typing import Any

from jupyter_gpu.output import _bytes
from kernel_worker import protocol as P

MOST_LISTED = 8  # names shown in a note before "and N more"


class SnapshotCommands:
    session_id: str
    remote: Any
    _notebook: str
    _request: Any
    _note: Any

    def _snapshot_request(self, op: str, **content: Any) -> dict:
        msg = P.Message(P.Msg.SNAPSHOT, {"op": op, "notebook": self._notebook, **content}, self.session_id)
        return self._request(msg).content

    def _snapshot(self, _: str) -> None:
        s = self._snapshot_request("take")
        print(f"snapshot {s['id']}: {names_text(s['names'])} ({_bytes(s['bytes'])}) in {s['seconds']:.2f} s")
        for name, why in (s.get("left") or {}).items():
            print(f"  not kept: {name}: {why}")
        for note in s.get("evicted") or []:
            print(f"  {note}")

    def _snapshots(self, _: str) -> None:
        found = self._snapshot_request("list")["snapshots"]
        if not found:
            print("no snapshots of this notebook (one is taken when its worker is released for being idle)")
        for s in found:
            print(f"{s['id']}  {when(s.get('at'))}  {_bytes(s.get('bytes', 0)):>10}  {names_text(s.get('names', []))}")

    def _restore(self, rest: str) -> None:
        r = self._snapshot_request("restore", id=rest.strip() or None)
        if "chosen" in r:
            # Its names come back with the next worker (as after `%gpu release --keep`): a cell
            # that reads them is not refused as if they were lost.
            listed = {x.get("id"): x for x in self._snapshot_request("list")["snapshots"]}
            self.remote.restored(list(listed.get(r["chosen"], {}).get("names") or []))
            print(f"the next %%gpu cell starts from snapshot {r['chosen']}")
            return
        self.remote.reset()
        text = restored_text(r)
        if not r.get("failed"):
            self.remote.restored(r["names"])
        print(text)

    def _restored(self, r: dict) -> bool:
        """A new worker started from a snapshot: say so in the cell's line; the names it
        holds again are the worker's. False when the snapshot could not be read."""
        self._note(restored_text(r))
        if r.get("failed"):
            return False
        self.remote.restored(r["names"])
        return True


def names_text(names: list[str]) -> str:
    shown = ", ".join(names[:MOST_LISTED]) + (
        f" and {len(names) - MOST_LISTED} more" if len(names) > MOST_LISTED else ""
    )
    return f"{len(names)} name{'s' * (len(names) != 1)}" + (f" ({shown})" if names else "")


def when(at: Any) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M") if isinstance(at, (int, float)) else "?"


def restored_text(r: dict) -> str:
    """``restored 14 names (3.1 GiB) from the snapshot of 12:02 in 2.4 s``, what was not
    kept and why; or why the snapshot could not be read."""
    if r.get("failed"):
        return f"snapshot {r.get('id', '')} could not be restored ({r['failed']}): this cell runs in a fresh namespace"
    taken = datetime.datetime.fromtimestamp(r["taken_at"]).strftime("%H:%M") if r.get("taken_at") else "?"
    size, seconds = _bytes(r.get("bytes", 0)), r.get("seconds", 0.0)
    text = f"restored {names_text(r['names'])} ({size}) from the snapshot of {taken} in {seconds:.1f} s"
    if r.get("lazy"):
        text += f"; {len(r['lazy'])} large value(s) load when first read"
    lost = {**(r.get("left") or {}), **(r.get("not_loaded") or {})}
    if lost:
        text += "; not kept: " + "; ".join(f"{n} ({why})" for n, why in list(lost.items())[:MOST_LISTED])
    return text
