"""Spending limits the daemon enforces, so a killed kernel cannot escape them: per cell
(the notebook's ``--budget``), per notebook per day, per user per day and per month (the
operator's ``c.Budgets.*``; a user may ask for lower ones). A cell that would start past
a limit is refused before it takes a GPU; a running cell is interrupted the moment its
spend reaches one (then stopped, as ``--timeout`` does); an idle session whose owner has
nothing left is released. Warm idle time counts, and spent money is summed from the
ledger, so limits hold across daemon restarts.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from traitlets import Float
from traitlets.config import LoggingConfigurable

from kernel_worker import protocol as P
from kernel_worker.ledger_db import day_of
from kernel_worker.prices import limit_text
from kernel_worker.session import Session

if TYPE_CHECKING:
    from kernel_worker.daemon.app import WorkerDaemon

CELL = "cell"
SHARED = ("notebook_per_day", "user_per_day", "user_per_month")  # summed over sessions, from the ledger
WORDS = {
    CELL: "this cell's budget",
    "notebook_per_day": "this notebook's budget for today",
    "user_per_day": "your budget for today",
    "user_per_month": "your budget for this month",
}
REPORT_WORDS = {"user_per_day": "you, today", "user_per_month": "you, this month"}
WHEN = {
    "notebook_per_day": "at midnight (host time)",
    "user_per_day": "at midnight (host time)",
    "user_per_month": "on the 1st (host time)",
}
MAX_USD = 1e9  # a limit a client asks for is a finite number below this
WATCH_S = 1.0  # how often a budget is looked at when progress messages are off
CROSSED_S = 1e-3  # a limit this close counts as reached (timers wake a hair early)


class BudgetError(ValueError):
    pass


class Budgets(LoggingConfigurable):
    notebook_per_day = Float(
        0.0, help="USD one notebook (of one user) may spend per day, warm idle time included (0: no limit)."
    ).tag(config=True)
    user_per_day = Float(0.0, help="USD one user may spend per day, all notebooks (0: no limit).").tag(config=True)
    user_per_month = Float(0.0, help="USD one user may spend per calendar month (0: no limit).").tag(config=True)

    def __init__(self, daemon: WorkerDaemon, **kw: object):
        super().__init__(parent=daemon, **kw)
        self.d = daemon
        self.own: dict[str, dict] = {}  # user -> the limits their last cell asked for

    # ------------------------------------------------------------------ limits

    @staticmethod
    def asked(content: dict) -> dict[str, float]:
        """The limits a request asks for (``budget``: this cell; ``budgets``: the user's own
        lower daily/monthly ones), validated: finite and positive, known scopes only."""
        try:
            wanted = dict(content.get("budgets") or {})
        except (TypeError, ValueError):
            raise BudgetError("budgets is a map of scope to US dollars, e.g. {'user_per_day': 5}") from None
        if content.get("budget") is not None:
            wanted[CELL] = content["budget"]
        out = {}
        for scope, usd in wanted.items():
            if scope not in WORDS:
                raise BudgetError(f"unknown budget {str(scope)[:40]!r}; known: {', '.join(WORDS)}")
            if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 < usd < MAX_USD:
                raise BudgetError(f"a budget is a positive number of US dollars, not {str(usd)[:40]!r} ({scope})")
            out[scope] = float(usd)
        return out

    def limits(self, s: Session) -> dict[str, tuple[float, str]]:
        """Each limit ``s`` is held to, with who set it: the lower of the operator's and the user's."""
        out = {}
        for scope in (CELL, *SHARED):
            host, mine = getattr(self, scope, 0.0), s.budgets.get(scope, 0.0)
            if host > 0 and (mine <= 0 or host <= mine):
                out[scope] = (host, "host")
            elif mine > 0:
                out[scope] = (mine, "user")
        return out

    def _mine(self, user: str, notebook: str | None) -> list[Session]:
        return [
            o for o in self.d.sessions.live.values() if o.user == user and (notebook is None or o.notebook == notebook)
        ]

    def spent(self, s: Session, scope: str) -> float:
        if scope == CELL:
            return self.d.ledger.usd(s, time.monotonic() - s.cell_started) if s.state == "busy" else 0.0
        return self.spent_by(s.user, s.notebook if scope == "notebook_per_day" else None, scope)

    def spent_by(self, user: str, notebook: str | None, scope: str) -> float:
        """Billed so far in ``scope``'s period, plus what live sessions have accrued."""
        today = day_of(time.time())
        first = today[:8] + "01" if scope == "user_per_month" else today
        billed = self.d.ledger.spent(user, first, notebook)
        return billed + sum(self.d.ledger.unbilled(o) for o in self._mine(user, notebook))

    def _rate(self, s: Session, scope: str) -> float:
        """USD per second now accruing against ``scope``."""
        held = [s] if scope == CELL else self._mine(s.user, s.notebook if scope == "notebook_per_day" else None)
        return sum(self.d.ledger.price(o) for o in held) / 3600

    def free(self, s: Session) -> bool:
        """Work that costs nothing is never refused or stopped: stopping it saves nothing."""
        return not self.d.ledger.price(s) if s.gpus else s.request.is_cpu

    def reached(self, s: Session, scopes: tuple = (CELL, *SHARED), starting: bool = False) -> tuple[str, float] | None:
        """The first limit ``s`` has reached (scope, spent), or None. A cell ``starting``
        would cost: nothing may be left, not even a millisecond's worth."""
        for scope, (limit, _) in self.limits(s).items():
            if scope in scopes:
                spent = self.spent(s, scope)
                rate = 1.0 if starting else self._rate(s, scope)
                if limit - spent <= rate * CROSSED_S:
                    return scope, spent
        return None

    def seconds_left(self, s: Session) -> float:
        """Seconds until the nearest limit is reached at the rate money accrues now."""
        left = math.inf
        for scope, (limit, _) in self.limits(s).items():
            rate = self._rate(s, scope)
            if rate > 0:
                left = min(left, (limit - self.spent(s, scope)) / rate)
        return left

    # ------------------------------------------------------------------ words

    def text(self, s: Session, scope: str, spent: float, stopping: bool) -> str:
        """Which budget, the figures, and how to raise it."""
        limit, who = self.limits(s)[scope]
        head = f"{WORDS[scope]} is spent: ${spent:.4f} of {limit_text(limit)}"
        if scope == CELL:
            how = "give the cell a higher --budget (or raise c.GPUMagics.default_budget)"
        elif who == "host":
            how = f"it resets {WHEN[scope]}; the host's operator can raise c.Budgets.{scope}"
        else:
            how = f"it resets {WHEN[scope]}; you set it yourself: raise c.GPUMagics.budgets[{scope!r}]"
        act = "the cell was interrupted" if stopping else "nothing ran and no GPU was taken"
        return f"{head}; {act}. {how[0].upper()}{how[1:]}"

    def report(self, user: str) -> list[dict]:
        """The budget lines of ``user``'s spend report: the host's daily and monthly limits,
        or the user's own lower ones (as their last cell asked)."""
        out = []
        for scope in ("user_per_day", "user_per_month"):
            limits = [x for x in (getattr(self, scope), self.own.get(user, {}).get(scope, 0.0)) if x > 0]
            if limits:
                limit, spent = min(limits), self.spent_by(user, None, scope)
                left = max(0.0, limit - spent)
                out.append({"scope": REPORT_WORDS[scope], "limit_usd": limit, "spent_usd": spent, "left_usd": left})
        return out

    # ------------------------------------------------------------------ enforcing

    def refusal(self, s: Session) -> str:
        """Why a cell of ``s`` may not start (a shared limit has nothing left), or ""."""
        if self.free(s):
            return ""
        hit = self.reached(s, SHARED, starting=True)
        return self.text(s, hit[0], hit[1], stopping=False) if hit else ""

    def watch(self, s: Session, msg: P.Message) -> None:
        """Interrupt ``msg``'s cell the moment its spend reaches a limit: a timer for when
        the nearest one would be reached (at most a progress interval away, as rates change
        when the user's other sessions start or end), which looks again. A timer, not a
        task: a cell costs no more than its check."""
        if s.current is not msg or s.state != "busy" or s.releasing:
            return  # the cell ended: nothing to watch
        hit = self.reached(s)
        if hit is not None:
            self.d.spawn(self._stop(s, msg, *hit), s.tasks)
            return
        most = self.d.progress_interval or WATCH_S  # progress off (0): still look again, never spin
        asyncio.get_running_loop().call_later(min(max(self.seconds_left(s), 0.0), most), self.watch, s, msg)

    async def _stop(self, s: Session, msg: P.Message, scope: str, spent: float) -> None:
        why = self.text(s, scope, spent, stopping=True)
        await self.d.reaper.stop_cell(s, msg, why, f"the cell reached {WORDS[scope]}", P.Err.BUDGET)
        over = self.idle_over(s) if scope != CELL and not s.releasing else ""
        if over:  # idle, it would go on costing: its GPUs go now, not at the reaper's next look
            self.d.sessions.release_now(s, over, code=P.Err.BUDGET)

    def idle_over(self, s: Session) -> str:
        """Why an idle session should be let go (its owner has nothing left), or ""."""
        hit = None if self.free(s) else self.reached(s, SHARED)
        if hit is None:
            return ""
        limit, _ = self.limits(s)[hit[0]]
        spent = f"${hit[1]:.4f} of {limit_text(limit)}"
        return f"{WORDS[hit[0]]} is spent ({spent}): its GPUs were released so idle time stops"
