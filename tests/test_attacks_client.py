"""Attacks on the notebook side, performed for real: a stale connection file that names
someone else's process to `jupyter gpu stop`, and a notebook whose metadata picks a worker
image behind the user's back. Each must fail with a clear message while the rest works."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_notebook
from support import dockerd
from support.daemons import docker_args
from support.shells import notes as cell_notes
from support.shells import run

from jupyter_gpu import notebook

CLI_TIMEOUT = 60
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def jupyter_gpu(*args: str) -> subprocess.CompletedProcess:
    """`jupyter gpu ARGS` as a user runs it: the installed ``jupyter-gpu`` script."""
    script = Path(sys.executable).with_name("jupyter-gpu")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "jupyter_gpu.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT)


def pending_sigterm(pid: int) -> bool:
    """Whether a SIGTERM is waiting for ``pid`` (it blocks SIGTERM, so one sent stays pending)."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = [int(m, 16) for m in re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.M)]
    return any(p & SIGTERM_BIT for p in pending)


@pytest.fixture
def bystander():
    """`sleep 300`, an unrelated process of ours, with SIGTERM blocked: a SIGTERM sent to it
    would stay pending where /proc shows it, so "not signalled" is a fact, not a race."""
    proc = subprocess.Popen(
        ["sleep", "300"], preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    )
    yield proc
    proc.kill()  # by its pid
    proc.wait(10)


def write_connection_file(path: Path, url: str, key: str, pid: object) -> None:
    path.write_text(json.dumps({"url": url, "key": key, "pid": pid, "backend": "process"}))
    path.chmod(0o600)


def refusal(pid: int, cf: Path, said: str) -> str:
    return (
        f"refusing to stop pid {pid}, which the connection file {cf} names: {said}, "
        f"so pid {pid} is not the daemon that wrote the file; it runs `sleep 300`.\n"
        f"Nothing was signalled. The file is stale: remove it with `rm {cf}`. "
        f"If pid {pid} is a jupyter-gpu daemon that stopped answering, stop it yourself: `kill {pid}`.\n"
    )


# ---------------------------------------------------------------------- jupyter gpu stop


def test_stop_leaves_a_process_alone_that_a_stale_connection_file_names(runtime_dir, tmp_path, bystander):
    cf = runtime_dir / "jupyter-gpu-daemon.json"  # the default file, found through the runtime dir
    dead = f"ipc://{tmp_path}/gone.sock"
    write_connection_file(cf, dead, "a-key-nobody-holds", bystander.pid)

    done = jupyter_gpu("stop")

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == refusal(bystander.pid, cf, f"nothing listens at {dead}")
    assert bystander.poll() is None and not pending_sigterm(bystander.pid)
    assert cf.exists()  # the user's to remove, as the message says


def test_stop_refuses_a_file_whose_pid_is_not_the_daemon_answering_at_its_url(daemon_factory, tmp_path, bystander):
    d = daemon_factory("--simulate-gpus=H100:1")
    forged = tmp_path / "forged.json"  # the real daemon's url and key, someone else's pid
    write_connection_file(forged, d.url, d.key.decode(), bystander.pid)

    done = jupyter_gpu("--connection-file", str(forged), "stop")

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == refusal(bystander.pid, forged, f"the daemon at {d.url} answers as pid {d.proc.pid}")
    assert bystander.poll() is None and not pending_sigterm(bystander.pid)
    assert d.proc.poll() is None and set(d.client().call("ping", timeout=10)) == {"incarnation"}  # not touched either


@pytest.mark.parametrize("pid", [-1, 0, 1, "123", True])
def test_stop_refuses_a_pid_that_no_daemon_can_have(runtime_dir, monkeypatch, capsys, pid):
    # kill(-1) would signal every process we may signal, kill(0) our own group, 1 is init.
    # So this one runs the command in-process with every way to signal replaced by a tripwire:
    # a regression fails the test instead of signalling for real.
    from jupyter_gpu import cli

    def tripwire(*args: object) -> None:
        raise AssertionError(f"jupyter gpu stop tried to signal or open {args}")

    for mod, name in [(os, "kill"), (os, "killpg"), (os, "pidfd_open"), (signal, "pidfd_send_signal")]:
        monkeypatch.setattr(mod, name, tripwire)
    cf = runtime_dir / "jupyter-gpu-daemon.json"
    write_connection_file(cf, f"ipc://{runtime_dir}/gone.sock", "k", pid)

    assert cli.main(["stop"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"refusing to stop pid {pid!r}, which the connection file {cf} names: that is no daemon's pid.\n"
        f"Nothing was signalled. The file is damaged: remove it with `rm {cf}`.\n"
    )


def test_stop_still_stops_a_real_daemon(daemon_factory):
    d = daemon_factory("--simulate-gpus=H100:1")
    pid = d.proc.pid

    done = jupyter_gpu("--connection-file", d.connection_file, "stop")

    assert (done.returncode, done.stdout, done.stderr) == (0, f"stopped daemon {pid}\n", "")
    assert d.proc.wait(10) == 0  # it had exited when stop returned; the wait only reaps it
    assert not os.path.exists(d.connection_file)  # removed by the daemon on its way out
    again = jupyter_gpu("--connection-file", d.connection_file, "stop")
    assert (again.returncode, again.stdout) == (0, f"no daemon to stop: no connection file at {d.connection_file}\n")


# ---------------------------------------------------------------------- the notebook's image


@pytest.fixture
def sidebar_choice():
    yield
    notebook.use(None)


def notebook_with(path: Path, choice: dict) -> None:
    nb = new_notebook()
    nb.metadata["jupyter_gpu"] = choice
    nbformat.write(nb, path)


def cost_lines(cap) -> list[str]:
    return [o.data["text/plain"] for o in cap.outputs if o.data.get("text/plain", "").startswith("⏱")]


def notes(cap) -> list[str]:
    """The extension's notes (in the cost line), timings masked; nothing of its own on stderr."""
    assert cap.stderr == ""
    return [re.sub(r"\d+\.\d\d s", "T s", n) for n in cell_notes(cap)]


FROM_META = "this notebook's jupyter_gpu metadata"


def test_a_metadata_image_never_rides_along_with_a_cell_that_names_its_gpu(
    daemon_factory, make_shell, tmp_path, monkeypatch, sidebar_choice
):
    d = daemon_factory("--simulate-gpus=H100:1,A100-80GB:1")  # process backend: no images at all
    nb = tmp_path / "shared-with-me.ipynb"
    notebook_with(nb, {"gpu": "A100-80GB", "image": "evil/miner:latest"})
    monkeypatch.setenv("JPY_SESSION_NAME", str(nb))  # as Jupyter Server tells its kernels
    ip = make_shell(d)

    # The cell names its GPU: the metadata's image is not taken.
    result, cap = run(ip, "%%gpu H100\nprint('mine')")
    assert result.success and cap.stdout == "mine\n"
    assert notes(cap) == ["cold start T s"]
    assert [c.split(" · ")[0] for c in cost_lines(cap)] == ["⏱ H100 ×1 (simulated)"]
    assert "image" not in cost_lines(cap)[0]

    # A cell that leaves the choice to the notebook takes it, and the refusal says where it came from.
    result, cap = run(ip, "%%gpu\nprint('never')")
    assert not result.success and "never" not in cap.stdout
    assert str(result.error_in_exec) == (
        "could not start a worker: the process backend cannot honour --image: run the daemon with "
        f"--backend docker for images and volumes (the image 'evil/miner:latest' came from {FROM_META})"
    )

    # Everything else keeps working: a named GPU, then the metadata's GPU without its image.
    result, cap = run(ip, "%%gpu H100\nprint('still mine')")
    assert result.success and cap.stdout == "still mine\n"
    notebook_with(nb, {"gpu": "A100-80GB"})
    result, cap = run(ip, "%%gpu\nprint('on the choice')")
    assert result.success and cost_lines(cap)[0].startswith("⏱ A100-80GB ×1 (simulated)")

    # Metadata that is not an image name is refused, not ignored.
    notebook_with(nb, {"gpu": "A100-80GB", "image": ["evil"]})
    result, cap = run(ip, "%%gpu\nprint('never')")
    assert str(result.error_in_exec) == (
        f"jupyter_gpu.image in {nb} must be an image name string, not ['evil']. Nothing was run."
    )


def test_an_image_other_than_the_default_is_shown_with_where_it_came_from(
    engine, daemon_factory, make_shell, tmp_path, monkeypatch, sidebar_choice
):
    d = daemon_factory(*docker_args(engine, "--simulate-gpus=H100:1"))
    nb = tmp_path / "shared-with-me.ipynb"
    notebook_with(nb, {"gpu": "cpu", "image": dockerd.IMAGE})
    monkeypatch.setenv("JPY_SESSION_NAME", str(nb))
    ip = make_shell(d)
    from_meta = f"image {dockerd.IMAGE} (from {FROM_META})"

    result, cap = run(ip, "%%gpu\nprint('on the notebook image')")
    assert result.success and cap.stdout == "on the notebook image\n"
    assert notes(cap) == ["cold start T s"]
    [cost] = cost_lines(cap)
    assert cost.startswith("⏱ cpu · ") and cost.endswith(f" · {from_meta}")

    # A cell naming its GPU runs on the running worker, which keeps its image: said, and shown.
    result, cap = run(ip, "%%gpu cpu\nprint('same worker')")
    assert result.success and cap.stdout == "same worker\n"
    assert notes(cap) == [
        f"this cell ran on this session's running worker, which keeps {from_meta}; "
        "`%gpu release` first to start one with the default image"
    ]
    assert cost_lines(cap)[0].endswith(f" · {from_meta}")

    # Released, the same cell starts a worker on the default image: no image shown.
    run(ip, "%gpu release")
    result, cap = run(ip, "%%gpu cpu\nprint('default image')")
    gone = "the previous worker is gone (released by the user); its variables are lost"
    assert result.success and notes(cap) == [gone, "cold start T s"]
    assert "image" not in cost_lines(cap)[0]

    # The cell's own --image is shown too, saying it came from the cell.
    run(ip, "%gpu release")
    result, cap = run(ip, f"%%gpu cpu --image {dockerd.IMAGE}\nprint('cell image')")
    from_cell = f"image {dockerd.IMAGE} (from this cell's --image)"
    assert result.success and notes(cap) == [gone, "cold start T s"]
    assert cost_lines(cap)[0].endswith(f" · {from_cell}")
