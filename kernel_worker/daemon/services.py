"""Answers that do not touch a session's worker: hello, the host's status as the
asking user may see it, a session's cost, spend reports, and volumes."""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import TYPE_CHECKING

from kernel_worker import inventory, ledger_db
from kernel_worker import protocol as P
from kernel_worker.backends.base import NO_VOLUMES, VolumeError
from kernel_worker.daemon import spend
from kernel_worker.daemon.pool import WARM_PREFIX

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

VOLUME_OPS = ("ls", "du", "create", "rm")


class Services:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon

    def _everyone(self, msg: P.Message, user: str) -> bool:
        """Whether this request may see every user's data: operators asking for ``all``."""
        return bool(msg.content.get("all")) and user in self.d.operators

    def hello(self, ident: bytes, msg: P.Message, user: str) -> None:
        d = self.d
        shares = d.backend_instance.shares_files  # the same-host shortcut only where workers see this host's files
        welcome = {
            "protocol": P.PROTOCOL_VERSION,
            "backend": d.backend,
            "pid": os.getpid(),
            "gpus": [g.to_json() for g in d.scheduler.gpus],
            "idle_timeout": d.idle_timeout,
            "bulk_root": d.bulk_root if shares else "",
            "bulk_probe": d.bulk_probe if shares else "",
            "incarnation": d.incarnation,
        }
        d.front.reply(ident, msg, welcome, P.Msg.WELCOME)

    def status(self, ident: bytes, msg: P.Message, user: str) -> None:
        self.d.front.reply(ident, msg, self.host_status(user, self._everyone(msg, user)))

    def cost(self, ident: bytes, msg: P.Message, user: str) -> None:
        summary = self.d.ledger.summary(msg.session, self.d.sessions.live.get(msg.session))
        self.d.front.reply(ident, msg, summary)

    async def spend(self, ident: bytes, msg: P.Message, user: str) -> None:
        since, by = msg.content.get("since", 0.0) or 0.0, msg.content.get("by") or ""
        if isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since):
            self.d.front.fail(ident, msg, P.Err.BAD_MESSAGE, "since is unix seconds")
            return
        if by and by not in spend.BY:
            self.d.front.fail(
                ident, msg, P.Err.BAD_MESSAGE, f"by is one of {', '.join(spend.BY)}, not {str(by)[:20]!r}"
            )
            return
        who = None if self._everyone(msg, user) else user
        ledger, now = self.d.ledger, time.time()
        parts = [spend.live(s, ledger, now) for s in self.d.sessions.live.values() if who in (None, s.user)]
        ledger.flush()
        groups = await asyncio.to_thread(ledger_db.read_groups, ledger.path, who, float(since))  # 1M rows: 0.2 s
        parts += [spend.Part(*g) for g in groups]
        notebook = msg.content.get("notebook")
        if isinstance(notebook, str) and notebook:  # one notebook's spend (`%gpu cost --plot`)
            parts = [p for p in parts if p.notebook == notebook]
        reply = spend.build(parts, float(since), now, str(by), ledger.compare_with)
        if isinstance(notebook, str) and notebook:
            reply["notebook"] = notebook
        reply["budgets"] = self.d.budgets.report(user)
        self.d.front.reply(ident, msg, reply)

    async def volumes(self, ident: bytes, msg: P.Message, user: str) -> None:
        b = self.d.backend_instance
        op, name = msg.content.get("op"), str(msg.content.get("name") or "")
        ops = {
            "ls": lambda: b.list_volumes(user),
            "du": lambda: b.volume_usage(user),
            "create": lambda: b.create_volume(user, name),
            "rm": lambda: b.remove_volume(user, name),
        }
        if op == "ls" and not b.has_volumes:  # a listing is not an error: none here, and why
            self.d.front.reply(ident, msg, {"result": [], "note": NO_VOLUMES})
            return
        if op not in ops:
            text = f"unknown volumes operation {str(op)[:20]!r}; use {', '.join(VOLUME_OPS)}"
            self.d.front.fail(ident, msg, P.Err.BAD_MESSAGE, text)
            return
        try:
            result = await asyncio.to_thread(ops[op])  # the Docker SDK blocks
        except VolumeError as e:
            self.d.front.fail(ident, msg, P.Err.VOLUME, str(e))
            return
        self.d.front.reply(ident, msg, {"result": result})

    def _queued(self, entry: dict, user: str, everyone: bool) -> dict:
        """A place in the GPU queue: whose it is, and its session id only for its owner
        (a session id is what a request names)."""
        owner = self.d.sessions.owners.get(entry["session"])
        mine = everyone or owner == user
        return {**entry, "session": entry["session"] if mine else None, "user": owner}

    def host_status(self, user: str, everyone: bool) -> dict:
        """The host as ``user`` may see it: their own sessions (all, for operators); of a GPU
        someone else holds, who holds it but not their session id."""
        d = self.d
        now = time.monotonic()
        live = d.sessions.live
        gpus = []
        for g in d.scheduler.gpus:
            holder = d.scheduler.holder.get(g.uuid)
            warm = holder is not None and holder.startswith(WARM_PREFIX)
            s = live.get(holder or "")
            leaving = holder is not None and s is None and not warm  # its worker is being stopped
            reading = inventory.read(g)  # a simulated GPU has none
            gpus.append(
                {
                    **g.to_json(),
                    "session": None if warm or leaving or (s and not everyone and s.user != user) else holder,
                    "user": s.user if s else d.sessions.owners.get(holder) if leaving else None,
                    "releasing": leaving,
                    "warm": warm,
                    "util": reading.util,
                    "memory_used_bytes": reading.memory_used_bytes,
                }
            )
        sessions = [
            {
                "id": s.id,
                "state": s.state,
                "detached": s.detached,  # its kernel went away: `%gpu attach ID` takes it over
                "device": s.device,
                "gpus": [g.uuid for g in s.gpus],
                "idle_s": now - s.last_active if s.state == "idle" else 0.0,
                "idle_timeout": d.idle_timeout,
                "held_s": now - s.started_at,
                "usd": d.ledger.session_usd(s),
                "cells": len(s.cells),
                "versions": s.versions,
                "user": s.user,
                "notebook": s.notebook,
            }
            for s in live.values()
            if everyone or s.user == user
        ]
        warm = [
            {
                "device": w.device,
                "gpus": [g.uuid for g in w.gpus],
                "state": w.state,
                "idle_s": now - w.started_at,
                "usd": d.ledger.usd(w, now - w.started_at),
            }
            for w in d.pool.warm
        ]
        return {
            "gpus": gpus,
            "sessions": sessions,
            "warm": warm,
            "queue": [self._queued(q, user, everyone) for q in d.scheduler.queue()],
            "backend": d.backend,
            "volumes": d.backend_instance.has_volumes,
        }
