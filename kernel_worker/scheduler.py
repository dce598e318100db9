"""Which GPUs a request gets, and who waits for what.

A request is ``MODEL[:N]``, alternatives joined by ``|`` (first that can be met wins),
``any[:N]`` (any GPU model; the cpu device on a host without GPUs) or ``cpu``.
Requests that cannot be met now wait in one FIFO queue; requests no GPU on this
host could ever meet fail at once.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Callable

from kernel_worker.inventory import CPU, GPU

ANY = "any"
_PART_RE = re.compile(r"^([A-Za-z0-9-]+)(?::(\d+))?$")


class SpecError(ValueError):
    """A request that is malformed or that this host can never satisfy."""


@dataclass(frozen=True)
class Request:
    """Alternatives of (model, count), tried in order. ``model`` may be ANY or CPU."""

    alternatives: tuple[tuple[str, int], ...]
    text: str

    @property
    def is_cpu(self) -> bool:
        return self.alternatives == ((CPU, 0),)


def parse(spec: str) -> Request:
    alternatives = []
    for part in spec.strip().split("|"):
        m = _PART_RE.match(part.strip())
        if not m:
            raise SpecError(
                f"cannot read GPU request {spec!r}: write MODEL[:COUNT], alternatives joined by '|', "
                "e.g. H100, H100:2, 'H100|A100', any or cpu"
            )
        model, count = m.group(1), int(m.group(2) or 1)
        if count < 1:
            raise SpecError(f"GPU count must be at least 1 in {spec!r}")
        if model.lower() == CPU:
            alternatives.append((CPU, 0))
        elif model.lower() == ANY:
            alternatives.append((ANY, count))
        else:
            alternatives.append((model, count))
    return Request(tuple(alternatives), spec.strip())


def _matches(model: str, gpu: GPU) -> bool:
    """``A100`` matches A100-80GB and A100-40GB; names compare case-insensitively."""
    want, have = model.lower(), gpu.model.lower()
    return model == ANY or want == have or have.startswith(want + "-")


@dataclass(eq=False)
class _Waiter:
    req: Request
    session: str
    fut: asyncio.Future
    on_position: Callable[[int], None]
    position: int = 0


class Scheduler:
    """Holds the free pool and the queue. Not thread-safe: the daemon's loop owns it."""

    def __init__(self, gpus: list[GPU], holds: bool = True):
        self.gpus = gpus
        # False where another scheduler (Slurm's) places sessions: requests are checked
        # against what it offers, never held or queued here.
        self.holds = holds
        self.holder: dict[str, str] = {}  # gpu uuid -> session id
        self._queue: list[_Waiter] = []

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for g in self.gpus:
            counts[g.model] = counts.get(g.model, 0) + 1
        held = ", ".join(f"{m}:{n}" for m, n in counts.items())
        return f"{held + ', ' if held else 'no GPUs, '}cpu"

    def check(self, req: Request) -> None:
        """Raise SpecError if no alternative could ever be met on this host."""
        for model, count in req.alternatives:
            if model == CPU or (model == ANY and not self.gpus):
                return
            if sum(_matches(model, g) for g in self.gpus) >= count:
                return
        raise SpecError(f"this host cannot provide {req.text!r}: it has {self.describe()}")

    def _try(self, req: Request, session: str) -> list[GPU] | None:
        for model, count in req.alternatives:
            if model == CPU or (model == ANY and not self.gpus):
                return []
            free = [g for g in self.gpus if g.uuid not in self.holder and _matches(model, g)]
            if len(free) >= count:
                chosen = free[:count]
                if self.holds:
                    for g in chosen:
                        self.holder[g.uuid] = session
                return chosen
        return None

    def satisfies(self, req: Request, gpus: list[GPU]) -> bool:
        """Whether an existing allocation already meets ``req`` (so the session can stay)."""
        for model, count in req.alternatives:
            if model == CPU or (model == ANY and not self.gpus):
                if not gpus:
                    return True
            elif len(gpus) == count and all(_matches(model, g) for g in gpus):
                return True
        return False

    def could_use(self, req: Request, gpus: list[GPU]) -> bool:
        """Whether any of ``gpus`` is of a model some alternative of ``req`` accepts."""
        return any(model not in (CPU,) and _matches(model, g) for model, _ in req.alternatives for g in gpus)

    def allocate_now(self, req: Request, session: str) -> list[GPU] | None:
        """GPUs for ``req`` if free right now, else None. (A GPU freed while someone
        waits goes to the queue at once, so this never jumps a waiter that fits.)"""
        self.check(req)
        return self._try(req, session)

    async def acquire(
        self, req: Request, session: str, on_position: Callable[[int], None], timeout: float | None
    ) -> list[GPU]:
        """Wait in the FIFO queue for ``req``; ``on_position`` hears our 1-based place
        whenever it changes."""
        got = self.allocate_now(req, session)
        if got is not None:
            return got
        w = _Waiter(req, session, asyncio.get_running_loop().create_future(), on_position)
        self._queue.append(w)
        self._notify()
        try:
            return await asyncio.wait_for(asyncio.shield(w.fut), timeout)
        except BaseException:
            if w in self._queue:
                self._queue.remove(w)
                self._notify()
            elif w.fut.done() and not w.fut.cancelled():
                self.release(w.fut.result())  # granted just as we gave up
            raise

    def release(self, gpus: list[GPU]) -> None:
        for g in gpus:
            self.holder.pop(g.uuid, None)
        granted = False
        for w in list(self._queue):
            got = self._try(w.req, w.session)
            if got is not None:
                self._queue.remove(w)
                w.fut.set_result(got)
                granted = True
        if granted:
            self._notify()

    def _notify(self) -> None:
        for i, w in enumerate(self._queue, 1):
            if w.position != i:
                w.position = i
                w.on_position(i)

    def queue(self) -> list[dict]:
        return [{"session": w.session, "request": w.req.text} for w in self._queue]
