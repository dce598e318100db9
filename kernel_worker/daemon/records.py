"""What a restarted daemon needs: a record of each running worker on disk (who it
serves, its key, its GPUs), and adopting the workers that outlived their daemon, or
removing those it cannot vouch for."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import TYPE_CHECKING, Any

from kernel_worker import protocol as P
from kernel_worker import scheduler
from kernel_worker.inventory import GPU
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

RECORD_NAME = "session.json"


class Records:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon
        self.log = daemon.log

    def path(self, wid: str) -> str:
        return os.path.join(self.d.workers.session_dir(wid), RECORD_NAME)

    def save(self, s: Session) -> None:
        record = {
            "session": s.id,
            "key": s.key.decode(),
            "request": s.request.text,
            "gpus": [g.uuid for g in s.gpus],
            "user": s.user,
            "notebook": s.notebook,
            "held_since": time.time() - (time.monotonic() - s.started_at),
        }
        path = self.path(s.wid)
        fd = os.open(path + ".tmp", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def _load(self, wid: str) -> dict | None:
        try:
            with open(self.path(wid)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    async def adopt_or_reap(self) -> None:
        """After a restart: adopt the workers we have records for, remove the rest."""
        backend = self.d.backend_instance
        held = self.d.scheduler.holder
        found = dict(await backend.find())
        root = self.d.workers.sessions_root
        known = set(os.listdir(root)) if os.path.isdir(root) else set()
        for wid in sorted(known | set(found)):
            handle = found.get(wid)
            record = self._load(wid)
            gpus = [g for g in self.d.scheduler.gpus if record and g.uuid in record.get("gpus", [])]
            free = all(g.uuid not in held for g in gpus)
            if handle is not None and record and backend.is_running(handle) and free:
                self._adopt(record.get("session", wid), wid, record, handle, gpus)
                continue
            if handle is not None:
                self.log.info("removing leftover worker of session %s", wid)
                await backend.stop(handle)
            self.d.workers.remove_dirs(wid)

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
            user=record.get("user", ""),
            notebook=record.get("notebook", ""),
            wid=wid,
        )
        s.ready = asyncio.get_running_loop().create_future()
        s.ready.add_done_callback(lambda f: setattr(s, "state", "idle") if s.state == "adopting" else None)
        s.started_at = time.monotonic() - max(0.0, time.time() - float(record.get("held_since", time.time())))
        for g in gpus:
            self.d.scheduler.holder[g.uuid] = sid
        self.d.sessions.add(s)
        self.d.workers.by_wid[wid] = s
        if hasattr(handle, "log_path"):
            handle.log_path = self.d.workers.log_path(wid)
        self.d.workers.bind(wid)  # the worker reconnects to its socket by itself
        self.d.spawn(self.d.reaper.watch(s))
        self.log.info("adopted the running worker of session %s (%s)", sid, s.device)
