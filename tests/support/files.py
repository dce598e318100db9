"""Waiting for a file another process makes: the event a cell in a worker can give a test."""

from __future__ import annotations

import time
from pathlib import Path

POLL_S = 0.02


def wait_for_file(path: Path, timeout: float = 120.0) -> None:
    """Return once ``path`` exists; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout:g} s")
        time.sleep(POLL_S)  # polling a condition, with a deadline: no inotify across a container mount
