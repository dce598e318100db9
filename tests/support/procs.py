"""Processes a test started: waiting for them to listen, and stopping them by their
process id, politely first."""

from __future__ import annotations

import select
import signal
import subprocess
import time

START_TIMEOUT = 30.0


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_listening(port: int, timeout: float = START_TIMEOUT) -> None:
    """Until something accepts connections on loopback ``port`` (servers log their URL
    a moment before they listen)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            select.select([], [], [], 0.02)  # a retry interval, not a synchronisation
