"""A process's stderr, collected line by line, with a wait for a matching line."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path


class LogWatcher:
    """Collects a process's stderr lines; ``wait_for`` blocks until a line matches."""

    def __init__(self, stream, path: Path):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._path = path
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        with open(self._path, "a") as out:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace")
                out.write(line)
                out.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0, nth: int = 1) -> re.Match:
        """The ``nth`` line matching ``pattern``, waiting for it up to ``timeout`` seconds."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i, seen = 0, 0
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        seen += 1
                        if seen == nth:
                            return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no log line matching {pattern!r} within {timeout} s:\n{''.join(self.lines[-30:])}"
                    )
                self._cond.wait(left)
