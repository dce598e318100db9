"""``jupyter gpu daemon``: the daemon as a traitlets application, so it reads the usual
Jupyter config files (``jupyter_gpu_config.py``) and takes ``--WorkerDaemon.x=y``."""

from __future__ import annotations

import asyncio
import json
import sys

from jupyter_core.application import JupyterApp
from traitlets import Bool

from kernel_worker import __version__
from kernel_worker.backends.slurm import SlurmBackend
from kernel_worker.daemon.app import WorkerDaemon
from kernel_worker.daemon.budgets import Budgets
from kernel_worker.daemon.errors import StartRefused
from kernel_worker.daemon.snapshots import Snapshots
from kernel_worker.daemon.streams import Streams
from kernel_worker.ledger import Ledger
from kernel_worker.workspace import Workspaces


class DaemonApp(JupyterApp):
    name = "jupyter-gpu-daemon"
    version = __version__
    description = "Run the jupyter-gpu worker daemon on this (GPU) host."
    config_file_name = "jupyter_gpu_config"
    classes = [WorkerDaemon, Workspaces, Ledger, Budgets, Snapshots, Streams, SlurmBackend]
    print_ready = Bool(False, help="Print one JSON line to stdout once listening (for launchers).").tag(config=True)
    aliases = {
        "url": "WorkerDaemon.url",
        "backend": "WorkerDaemon.backend",
        "simulate-gpus": "WorkerDaemon.simulate_gpus",
        "idle-timeout": "WorkerDaemon.idle_timeout",
        "connection-file": "WorkerDaemon.connection_file",
        "log-level": "Application.log_level",
    }
    flags = {
        "print-ready": ({"DaemonApp": {"print_ready": True}}, "Print a JSON line once listening."),
        "debug": ({"Application": {"log_level": 10}}, "Log everything."),
        "curve": ({"WorkerDaemon": {"curve": True}}, "Serve notebooks over CurveZMQ (see `jupyter gpu keys`)."),
    }

    def start(self) -> None:
        def ready(info: dict) -> None:
            if self.print_ready:
                sys.stdout.write(json.dumps(info) + "\n")
                sys.stdout.flush()

        try:
            daemon = WorkerDaemon(parent=self, log=self.log)
            asyncio.run(daemon.run(ready))
        except StartRefused as e:
            self.log.critical("%s", e)
            self.exit(2)


def main(argv: list[str] | None = None) -> None:
    DaemonApp.launch_instance(argv)
