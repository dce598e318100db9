"""What a cell's start and end mean for money: a cell past a spending limit is refused
before it takes a GPU; a cell that ran before shows its last run's time and cost from
its start; a running cell is watched against its limits; its end is billed once, with
its GPU readings and, if the daemon stopped it, why."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from kernel_worker import protocol as P
from kernel_worker.daemon.budgets import BudgetError, Budgets
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

SOURCE_HASH_CHARS = 16


class Accounting:
    def __init__(self, daemon: WorkerDaemon):
        self.d = daemon

    def refusal(self, s: Session, msg: P.Message) -> str:
        """Why ``msg`` (a cell for ``s``, which may not have a worker yet) may not start, or
        "". Takes the limits the notebook asks for."""
        if msg.type != P.Msg.EXECUTE:
            return ""
        try:
            asked = Budgets.asked(msg.content)
        except BudgetError as e:
            return str(e)
        self.d.budgets.own[s.user] = asked
        if asked != s.budgets:
            s.budgets = asked
            if s.state != "starting":
                self.d.records.save(s)  # a restarted daemon holds the running cell to them too
        return self.d.budgets.refusal(s)

    def begin(self, s: Session, msg: P.Message) -> None:
        s.stopped = ""
        code = msg.content.get("code")
        s.source = hashlib.sha256(code.encode()).hexdigest()[:SOURCE_HASH_CHARS] if isinstance(code, str) else ""
        s.estimate = self.d.ledger.estimate(s, s.source)
        if s.estimate and s.estimate["wall_s"] >= self.d.progress_interval:
            # a cell long enough to have a status line has it from its start, with its last run
            self.d.attach.relay(s, msg.reply(P.Msg.PROGRESS, self.d.telemetry.reading(s, 0.0)))
        self.watch(s, msg)

    def watch(self, s: Session, msg: P.Message) -> None:
        if self.d.budgets.limits(s) and not self.d.budgets.free(s):
            self.d.budgets.watch(s, msg)

    def done(self, s: Session, msg: P.Message) -> dict:
        figures = s.telemetry.figures()
        if s.stopped:
            figures["stopped"] = s.stopped
            self.d.log.info("session %s: billed a cell the daemon stopped: %s", s.id, s.stopped)
        cell_budget = self.d.budgets.limits(s).get("cell")
        if cell_budget:
            figures["budget_usd"] = cell_budget[0]
        return self.d.ledger.cell(s, msg.parent, s.source, figures)
