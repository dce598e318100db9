"""The Docker backend against a real engine: volumes, isolation, limits, restarts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import dockerd
from support.daemons import docker_args
from support.shells import run

from kernel_worker import protocol as P
from kernel_worker.backends.docker import LABEL_SESSION
from kernel_worker.daemon.paths import default_state_dir


def containers(engine, session: str | None = None, all: bool = True) -> list:
    label = f"{LABEL_SESSION}={session}" if session else LABEL_SESSION
    return engine.client.containers.list(all=all, filters={"label": label})


def session_of(ip) -> str:
    return ip.magics_manager.registry["GPUMagics"].session_id


def test_volume_survives_release_and_daemon_restart(engine, daemon_factory, make_shell):
    args = docker_args(engine, "--simulate-gpus=H100:1")
    d = daemon_factory(*args)
    ip = make_shell(d)
    result, cap = run(
        ip, "%%gpu H100 --volume data:/data\nopen('/data/checkpoint.txt', 'w').write('epoch 3')\nprint('saved')"
    )
    assert result.success, cap.stdout
    run(ip, "%gpu release")
    result, cap = run(ip, "%%gpu H100 --volume data:/data\nprint(open('/data/checkpoint.txt').read())")
    assert "epoch 3" in cap.stdout
    result, cap = run(ip, "%gpu volumes ls")
    assert cap.stdout.startswith("data") and "mounted by" in cap.stdout
    result, cap = run(ip, "%gpu volumes rm data")
    assert "is mounted by running session" in str(result.error_in_exec)
    result, cap = run(ip, "%gpu volumes du")
    assert cap.stdout.startswith("data  7 B")  # "epoch 3"
    run(ip, "%gpu release")
    d.stop()
    d2 = daemon_factory(*args)
    ip = make_shell(d2)
    result, cap = run(ip, "%%gpu H100 --volume data:/data:ro\nprint(open('/data/checkpoint.txt').read())")
    assert "epoch 3" in cap.stdout
    result, cap = run(ip, "%%gpu H100 --volume data:/data:ro\nopen('/data/other.txt', 'w')")
    assert not result.success and "Read-only file system" in cap.stdout
    run(ip, "%gpu release")
    out = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", "--connection-file", d2.connection_file, "volumes", "rm", "data"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "removed volume data" in out.stdout
    assert not [v for v in engine.client.volumes.list() if v.name.endswith("-data")]


def test_volumes_of_two_users_never_meet(engine, daemon_factory, make_shell, tmp_path):
    # Two daemons whose operators run them for different users share one engine.
    alice = daemon_factory(*docker_args(engine, "--WorkerDaemon.user=alice"))
    ip = make_shell(alice)
    assert run(ip, "%%gpu cpu --volume data:/data\nopen('/data/secret', 'w').write('alice')")[0].success
    run(ip, "%gpu release")
    bob_dir = tmp_path / "bob"
    bob_dir.mkdir()
    from support.daemons import start_daemon

    bob = start_daemon(bob_dir, *docker_args(engine, "--WorkerDaemon.user=bob"))
    try:
        ip = make_shell(bob)
        result, cap = run(ip, "%%gpu cpu --volume data:/data\nimport os\nprint(sorted(os.listdir('/data')))")
        assert "[]" in cap.stdout  # bob's "data" is not alice's
        result, cap = run(ip, "%gpu volumes rm nothere")
        assert "you have no volume 'nothere'" in str(result.error_in_exec)
        run(ip, "%gpu release")
    finally:
        bob.stop()
    names = sorted(v.name for v in engine.client.volumes.list() if v.name.endswith("-data"))
    assert names == ["jupyter-gpu-alice-data", "jupyter-gpu-bob-data"]
    for v in engine.client.volumes.list():
        if v.name.endswith("-data"):
            v.remove()


def test_idle_release_removes_the_container(engine, daemon_factory, make_shell):
    d = daemon_factory(*docker_args(engine, "--idle-timeout=1", "--WorkerDaemon.reap_interval=0.2"))
    ip = make_shell(d)
    assert run(ip, "%%gpu cpu\nx = 1")[0].success
    assert len(containers(engine, session_of(ip))) == 1
    d.log.wait_for("released: it was idle", timeout=15)
    assert containers(engine, session_of(ip)) == []


def test_sigkilled_daemon_restarts_and_adopts_its_container(engine, daemon_factory, make_shell):
    args = docker_args(engine, "--simulate-gpus=H100:1")
    d = daemon_factory(*args)
    ip = make_shell(d)
    assert run(ip, "%%gpu H100\nx = 42")[0].success
    d.kill()
    d2 = daemon_factory(*args)
    d2.log.wait_for("adopted the running worker of session", timeout=20)
    status = d2.client().call(P.Msg.STATUS)
    assert status["gpus"][0]["session"] == session_of(ip)  # its GPU is still held
    result, cap = run(ip, "%%gpu H100\nprint('x is', x)")
    assert result.success and "x is 42" in cap.stdout  # same worker, same namespace


def test_restart_reaps_containers_it_cannot_adopt(engine, daemon_factory, make_shell):
    args = docker_args(engine, "--simulate-gpus=H100:1")
    d = daemon_factory(*args)
    ip = make_shell(d)
    assert run(ip, "%%gpu H100\nx = 42")[0].success
    sid = session_of(ip)
    d.kill()
    # Lose the daemon's record of the session: the container can only be removed.
    os.unlink(os.path.join(default_state_dir(d.connection_file), "records", f"{sid}.json"))
    d2 = daemon_factory(*args)
    d2.log.wait_for(f"removing leftover worker of session {sid}", timeout=20)
    assert containers(engine, sid) == []
    assert d2.client().call(P.Msg.STATUS)["gpus"][0]["session"] is None
    result, cap = run(ip, "%%gpu H100\nprint('x' in globals())")
    assert "False" in cap.stdout


def test_container_over_its_memory_limit_gives_the_oom_error(engine, daemon_factory, make_shell):
    d = daemon_factory(*docker_args(engine, "--DockerBackend.mem_limit=96m"))
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu cpu\nblocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))")
    assert not result.success
    assert "container was killed: out of memory, limit 96 MiB" in str(result.error_in_exec)
    assert run(ip, "%%gpu cpu\nprint('fresh')")[0].success


def test_image_without_pyzmq_fails_at_once_naming_it(engine, daemon_factory, make_shell):
    d = daemon_factory(*docker_args(engine, notebook_libs=False))
    ip = make_shell(d)
    result, cap = run(ip, f"%%gpu cpu --image {dockerd.IMAGE_NOZMQ}\nprint('never')")
    assert not result.success
    msg = str(result.error_in_exec)
    assert f"image '{dockerd.IMAGE_NOZMQ}' lacks pyzmq" in msg
    assert f"jupyter gpu image build --from {dockerd.IMAGE_NOZMQ}" in msg
    result, cap = run(ip, "%%gpu cpu --image no-such-image:1\nprint('never')")
    assert "image 'no-such-image:1' is not on this GPU host" in str(result.error_in_exec)
    result, cap = run(ip, f"%%gpu cpu --image {dockerd.IMAGE_OLDPICKLE}\nprint('never')")
    msg = str(result.error_in_exec)
    assert "cannot exchange values with this notebook" in msg and "cloudpickle 2.2" in msg
    assert containers(engine) == []  # nothing left behind by the failed starts


def test_gpu_assignment_and_no_network_inside_the_container(engine, daemon_factory, make_shell):
    d = daemon_factory(*docker_args(engine, "--simulate-gpus=H100:2"))
    ip = make_shell(d)
    result, cap = run(
        ip,
        "%%gpu H100:2\nimport os, socket\nprint(os.environ['JUPYTER_GPU_DEVICES'])\n"
        "print([n for _, n in socket.if_nameindex()])",
    )
    assert result.success, cap.stdout
    assert "H100:GPU-simulated-0000-H100,H100:GPU-simulated-0001-H100" in cap.stdout
    assert "['lo']" in cap.stdout  # --network none: loopback only


def test_image_build_layers_in_what_the_executor_needs(engine, daemon_factory, make_shell):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_gpu.cli",
            "image",
            "build",
            "--from",
            dockerd.IMAGE_NOZMQ,
            "--tag",
            "jupyter-gpu-test:rebuilt",
            "--docker-url",
            engine.url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "built jupyter-gpu-test:rebuilt" in out.stdout
    d = daemon_factory(*docker_args(engine, notebook_libs=False))
    ip = make_shell(d)
    result, cap = run(
        ip, "%%gpu cpu --image jupyter-gpu-test:rebuilt\nimport zmq, cloudpickle\nprint('ok', cloudpickle.__version__)"
    )
    assert result.success, cap.stdout
    import cloudpickle

    assert f"ok {cloudpickle.__version__}" in cap.stdout
    engine.client.images.remove("jupyter-gpu-test:rebuilt", force=True)


def test_a_daemon_stopped_while_its_pool_starts_a_container_leaves_none(engine, daemon_factory):
    d = daemon_factory(*docker_args(engine, "--WorkerDaemon.keep_warm={'cpu': 1}"))
    d.log.wait_for(r"warm cpu worker ready", timeout=60)
    msg = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": "1"}, "takes-the-warm-one")
    assert d.client().request(msg, timeout=60).content["ok"]
    d.stop()  # taking the warm worker set the pool refilling: stop while that container is made
    left = containers(engine)
    assert left == [], [(c.labels, c.status) for c in left]


def _owner_and_mode(path) -> tuple[int, str]:
    st = os.lstat(path)
    return st.st_uid, oct(st.st_mode & 0o777)


def _mounted_dir_is_the_workers_alone(mounted: Path, uid: int) -> None:
    """What the container mounts is the worker uid's, 0700; what holds it stays the daemon's, 0700."""
    assert _owner_and_mode(mounted) == (uid, "0o700"), mounted
    assert _owner_and_mode(mounted.parent) == (0, "0o700"), mounted.parent
    assert _owner_and_mode(mounted.parent.parent) == (0, "0o700"), mounted.parent.parent


@pytest.mark.skipif(os.getuid() != 0, reason="a daemon can run workers as another uid only as root")
def test_cells_as_another_uid_import_from_their_package_dir_and_no_one_else_can_read_it(
    engine, daemon_factory, make_shell
):
    d = daemon_factory(*docker_args(engine, "--DockerBackend.user=65534:65534"))
    ip = make_shell(d)
    result, cap = run(ip, "%gpu pip install pyjokes==0.8.3")  # a small pure-Python wheel from the index
    assert result.success, (cap.stdout, result.error_in_exec)
    code = "%%gpu cpu --no-sync\nimport os, importlib.metadata as m, pyjokes\nprint(os.getuid(), m.version('pyjokes'))"
    result, cap = run(ip, code)
    assert result.success and cap.stdout == "65534 0.8.3\n", (cap.stdout, result.error_in_exec)
    packages = next((Path(default_state_dir(d.connection_file)) / "packages").glob("*/py*"))
    _mounted_dir_is_the_workers_alone(packages, 65534)
    assert all(os.stat(p).st_mode & 0o004 for p in packages.rglob("*.py"))  # for uid 65534, behind the 0700 dir
    # The same daemon, its workers as its own uid again: the directory is handed back.
    d.stop()
    d = daemon_factory(*docker_args(engine))
    ip = make_shell(d)
    result, cap = run(ip, code)
    assert result.success and cap.stdout == "0 0.8.3\n", (cap.stdout, result.error_in_exec)
    _mounted_dir_is_the_workers_alone(packages, 0)


@pytest.mark.skipif(os.getuid() != 0, reason="a daemon can run workers as another uid only as root")
def test_cells_as_another_uid_work_in_the_synced_directory_and_no_one_else_can_read_it(
    engine, daemon_factory, make_shell, tmp_path, monkeypatch
):
    notebook = tmp_path / "nb"
    (notebook / "data").mkdir(parents=True)
    (notebook / "data" / "x.txt").write_text("from the notebook")
    monkeypatch.chdir(notebook)
    args = ("--simulate-gpus=H100:1", "--WorkerDaemon.keep_warm=H100=1", f"--Workspaces.root={tmp_path}/ws")
    d = daemon_factory(*docker_args(engine, "--DockerBackend.user=65534:65534", *args))
    ip = make_shell(d)
    for gpu in ("cpu", "H100"):  # a container started for the cell, and a warm one that mounts a spare
        code = f"%%gpu {gpu}\nimport os\nprint(os.getuid(), open('data/x.txt').read())\n"
        code += "_ = open('data/made.txt', 'w').write('by nobody')"
        result, cap = run(ip, code)
        assert result.success and cap.stdout == "65534 from the notebook\n", (cap.stdout, result.error_in_exec)
        (notebook / "data" / "x.txt").write_text("changed")  # synced again, into the worker's directory
        result, cap = run(ip, f"%%gpu {gpu}\nprint(open('data/x.txt').read())")
        assert result.success and cap.stdout == "changed\n", (cap.stdout, result.error_in_exec)
        result, cap = run(ip, "%gpu fetch data/made.txt")
        assert result.success and (notebook / "data" / "made.txt").read_text() == "by nobody", cap.stdout
        (notebook / "data" / "made.txt").unlink()
        (notebook / "data" / "x.txt").write_text("from the notebook")
        assert run(ip, "%gpu release")[0].success
    tree = next((tmp_path / "ws").glob("*/*/tree"))
    _mounted_dir_is_the_workers_alone(tree, 65534)
    assert all(os.lstat(p).st_uid == 65534 for p in tree.rglob("*"))  # what the sync wrote there too
