"""Process-backend workers outlive a daemon killed with SIGKILL (a restarted daemon adopts
them). A test that kills its daemon and does not restart it leaves them waiting; this
stops them by the pids their daemon wrote down, checking each pid is still that worker."""

from __future__ import annotations

import json
import os
import shutil
import signal

from kernel_worker.backends.process import STARTS_DIR, _started_at
from kernel_worker.daemon.paths import default_state_dir


def worker_pids(connection_file: str) -> list[int]:
    """Pids of the live workers the daemon of ``connection_file`` started."""
    root = os.path.join(default_state_dir(connection_file), STARTS_DIR)
    pids = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, name)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if _started_at(record["pid"]) == record["started"]:
            pids.append(record["pid"])
    return pids


def stop_workers(connection_file: str) -> None:
    for pid in worker_pids(connection_file):
        os.kill(pid, signal.SIGKILL)


def forget_daemon(connection_file: str) -> None:
    """After a test's daemon has stopped (or was killed): its leftover workers and its state
    directory (records, logs, sockets), which are that test's alone."""
    stop_workers(connection_file)
    shutil.rmtree(default_state_dir(connection_file), ignore_errors=True)
