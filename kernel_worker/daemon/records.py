"""What a restarted daemon needs: a record of each running worker on disk (who it
serves, its key, its GPUs), and adopting the workers that outlived their daemon, or
removing those it cannot vouch for.

Records live in the daemon's private state directory, never in anything mounted into a
worker: a container that could rewrite its record could come back, after a restart, as
another user's session. Adoption still checks each record against what the daemon
itself knows: the worker's label, the inventory, and the GPUs the worker was given."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import TYPE_CHECKING, Any

from kernel_worker import ledger_db, scheduler
from kernel_worker import protocol as P
from kernel_worker.daemon import paths
from kernel_worker.daemon.budgets import BudgetError, Budgets
from kernel_worker.daemon.errors import UnsafePath
from kernel_worker.daemon.pool import WARM_PREFIX
from kernel_worker.inventory import GPU
from kernel_worker.session import Session


def _names(root: str) -> set[str]:
    return set(os.listdir(root)) if os.path.isdir(root) else set()


if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

RECORD_SUFFIX = ".json"


class Records:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log

    @property
    def root(self) -> str:
        return os.path.join(self.d.state_dir, "records")

    def path(self, wid: str) -> str:
        return paths.child(self.root, wid + RECORD_SUFFIX)

    def save(self, s: Session) -> None:
        record = {
            "session": s.id,
            "key": s.key.decode(),
            "request": s.request.text,
            "gpus": [g.uuid for g in s.gpus],
            "user": s.user,
            "notebook": s.notebook,
            "held_since": time.time() - (time.monotonic() - s.started_at),
            "client": s.client.hex(),  # its notebook's routing id: a running cell's output goes on to it
            "budgets": s.budgets,  # the limits its notebook asked for: they hold across a restart
            "workspace": self.d.workdirs.key_of(s.id),  # its worker's copy is answered after a restart too
        }
        path = self.path(s.wid)
        with os.fdopen(paths.open_private(path + ".tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC), "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def remove(self, wid: str) -> None:
        try:
            os.unlink(self.path(wid))
        except (FileNotFoundError, UnsafePath):
            pass

    def _load(self, wid: str) -> dict | None:
        try:
            with os.fdopen(paths.open_private(self.path(wid), os.O_RDONLY)) as f:
                record = json.load(f)
        except (OSError, ValueError, UnsafePath):
            return None
        return record if isinstance(record, dict) else None

    def _vouch(self, wid: str, record: dict | None, handle: Any) -> list[GPU] | str:
        """The GPUs to adopt ``wid`` with, or why it cannot be adopted."""
        if record is None:
            return "no record of it"
        sid = record.get("session")
        if not isinstance(sid, str) or not P.SESSION_RE.match(sid) or not sid:
            return "its record names no valid session"
        if sid != wid and not wid.startswith(WARM_PREFIX):
            return f"its record names session {sid!r}, its worker is {wid!r}"
        try:
            scheduler.parse(str(record.get("request")))
            str(record["key"]).encode()
        except (scheduler.SpecError, KeyError):
            return "its record is incomplete"
        wanted = record.get("gpus")
        gpus = [g for g in self.d.scheduler.gpus if isinstance(wanted, list) and g.uuid in wanted]
        if not isinstance(wanted, list) or len(gpus) != len(wanted):
            return "its record names GPUs this host does not have"
        if any(g.uuid in self.d.scheduler.holder for g in gpus):
            return "its GPUs are held by another session"
        given = self.d.backend_instance.started_with(handle)
        if given is not None and sorted(given["gpus"]) != sorted(wanted):
            return f"it was given GPUs {sorted(given['gpus'])}, its record says {sorted(wanted)}"
        if given is not None and given["user"] != record.get("user"):
            return f"it was started for user {given['user']!r}, its record says {record.get('user')!r}"
        return gpus

    async def adopt_or_reap(self) -> None:
        """After a restart: adopt the workers we can vouch for, remove the rest."""
        backend = self.d.backend_instance
        found = dict(await backend.find())
        known = {n[: -len(RECORD_SUFFIX)] for n in _names(self.root) if n.endswith(RECORD_SUFFIX)}
        for wid in sorted(known | _names(self.d.workers.sessions_root) | set(found)):
            if not P.SESSION_RE.match(wid) or not wid:
                self.log.warning("ignoring a worker or record named %r: not a name this daemon makes", wid[:40])
                continue
            handle = found.get(wid)
            record = self._load(wid)
            if handle is not None and backend.is_running(handle):
                gpus = self._vouch(wid, record, handle)
                if not isinstance(gpus, str):
                    self._adopt(record["session"], wid, record, handle, gpus)
                    continue
                self.log.warning("not adopting the worker of session %s: %s", wid, gpus)
            if handle is not None:
                self.log.info("removing leftover worker of session %s", wid)
                await backend.stop(handle)
            self.remove(wid)
            self.d.workers.remove_dirs(wid)

    def _billed_before(self, s: Session) -> None:
        """What an adopted session's cells were billed before the restart, so its release
        does not bill that time again as warm idle time."""
        self.d.ledger.flush()
        busy = billed = 0.0
        for r in ledger_db.session_records(self.d.ledger.db, s.id):
            if r.get("kind") == "idle":  # an earlier session of the same id ended here
                busy = billed = 0.0
            elif r.get("kind") in ("cell", "snapshot", "restore"):
                busy += float(r.get("wall_s", r.get("seconds", 0.0)))
                billed += float(r.get("seconds", 0.0))
        s.busy_s, s.billed_s = busy, billed

    def _adopt(self, sid: str, wid: str, record: dict, handle: Any, gpus: list[GPU]) -> None:
        key = record["key"].encode()
        s = Session(
            sid,
            scheduler.parse(record["request"]),
            key,
            P.Signer(key),
            gpus=gpus,
            handle=handle,
            state="adopting",
            adopted=True,
            user=record.get("user", ""),
            notebook=record.get("notebook", ""),
            wid=wid,
        )
        s.ready = asyncio.get_running_loop().create_future()
        s.ready.add_done_callback(lambda f: setattr(s, "state", "idle") if s.state == "adopting" else None)
        s.started_at = time.monotonic() - max(0.0, time.time() - float(record.get("held_since", time.time())))
        self._billed_before(s)
        try:
            s.budgets = Budgets.asked({"budgets": record.get("budgets") or {}})
        except BudgetError as e:
            self.log.warning("session %s: its record's budgets are not valid (%s); the host's hold", sid, e)
        try:
            s.client = bytes.fromhex(str(record.get("client", "")))
        except ValueError:
            s.client = b""
        if record.get("workspace"):
            self.d.workdirs.adopted(s, record["workspace"])
        for g in gpus if self.d.scheduler.holds else ():
            self.d.scheduler.holder[g.uuid] = sid
        self.d.sessions.add(s)
        self.d.workers.by_wid[wid] = s
        if hasattr(handle, "log_path"):
            handle.log_path = self.d.workers.log_path(wid)
        self.d.workers.bind(s)  # the worker reconnects by itself
        self.d.spawn(self.d.reaper.watch(s))
        self.log.info("adopted the running worker of session %s (%s)", sid, s.device)
