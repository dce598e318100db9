"""The notebook's directory is not synced when the user says so: with
``c.GPUMagics.sync_workdir = False``, or ``%%gpu --no-sync`` for one cell, a daemon on
another host runs the cell without the notebook's files (a relative path is not found
there) and not one SYNC request leaves the notebook; with syncing on, the same cell reads
the file (so the spy and the path are the ones that matter)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.shells import plain, run
from support.workdir_story import CSV

from jupyter_gpu.client import DaemonClient
from kernel_worker import protocol as P

READ = "%%gpu cpu{flags}\nprint(open('data/x.csv').read(), end='')"


@pytest.fixture
def sent(monkeypatch) -> list[str]:
    """The type of every message the notebook's clients send to the daemon."""
    types: list[str] = []
    send = DaemonClient.send

    def spy(self, msg: P.Message) -> None:
        types.append(msg.type)
        send(self, msg)

    monkeypatch.setattr(DaemonClient, "send", spy)
    return types


def refused_file(result, cap) -> None:
    assert not result.success and type(result.error_in_exec).__name__ == "FileNotFoundError", result.error_in_exec
    assert str(result.error_in_exec) == "[Errno 2] No such file or directory: 'data/x.csv'"
    traceback = plain(cap.stdout)
    assert traceback.endswith("FileNotFoundError: [Errno 2] No such file or directory: 'data/x.csv'\n"), traceback


@pytest.mark.daemon_args("--Workspaces.root={tmp}/workspaces")
def test_sync_workdir_off_leaves_the_notebooks_files_behind(elsewhere_daemon, make_shell, notebook_dir, sent):
    ip = make_shell(elsewhere_daemon)
    ip.run_line_magic("config", "GPUMagics.sync_workdir = False")
    workspaces = Path(elsewhere_daemon.connection_file).parent / "workspaces"
    refused_file(*run(ip, READ.format(flags="")))
    assert P.Msg.EXECUTE in sent and P.Msg.SYNC not in sent
    assert not list(workspaces.rglob("x.csv"))  # nothing of the notebook's on the daemon's host
    ip.run_line_magic("config", "GPUMagics.sync_workdir = True")
    result, cap = run(ip, READ.format(flags=""))
    assert result.success and cap.stdout == CSV, (result.error_in_exec, cap.stdout)
    assert P.Msg.SYNC in sent and len(list(workspaces.rglob("x.csv"))) == 1  # the spy sees a sync when one is made


@pytest.mark.daemon_args("--Workspaces.root={tmp}/workspaces")
def test_no_sync_leaves_the_notebooks_files_behind_for_one_cell(elsewhere_daemon, make_shell, notebook_dir, sent):
    ip = make_shell(elsewhere_daemon)
    assert ip.magics_manager.registry["GPUMagics"].sync_workdir is True  # the default
    refused_file(*run(ip, READ.format(flags=" --no-sync")))
    assert P.Msg.EXECUTE in sent and P.Msg.SYNC not in sent
    result, cap = run(ip, READ.format(flags=""))  # the next cell syncs again
    assert result.success and cap.stdout == CSV, (result.error_in_exec, cap.stdout)
    assert P.Msg.SYNC in sent
