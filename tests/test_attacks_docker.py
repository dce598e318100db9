"""Attacks through the docker backend (issue 10, items 4, 5 and 13), performed for real: a
real daemon on the docker backend, the test dockerd, CurveZMQ users where two users meet.
Each attack must fail with a clear error while the daemon keeps serving another session."""

from __future__ import annotations

import os

import docker
import pytest
from support import dockerd
from support.curve import curve_users
from support.daemons import Daemon, docker_args, printed

from jupyter_gpu.client import DaemonClient, DaemonError
from kernel_worker import protocol as P
from kernel_worker.backends.base import VOLUME_NAME_RULE
from kernel_worker.backends.docker_rules import MOUNT_PATH_RULE
from kernel_worker.backends.docker_volumes import LABEL_SESSION, LABEL_USER, LABEL_VOLUME
from kernel_worker.daemon.paths import default_state_dir

TIMEOUT = 60


@pytest.fixture
def volumes_made(engine):
    """Removes, after the test and its daemons, every volume the test made (the engine
    outlives the test, and other suites count volumes). Ask for it before daemon_factory,
    so that it is torn down after the daemons that mount them."""
    before = {v.name for v in engine.client.volumes.list()}
    yield
    for c in engine.client.containers.list(all=True, filters={"label": LABEL_SESSION}):
        c.remove(force=True)
    for v in engine.client.volumes.list():
        if v.name not in before:
            v.remove(force=True)


def curve_daemon(engine, daemon_factory, tmp_path, names: tuple[str, ...], *extra: str):
    """A docker daemon serving CurveZMQ users ``names``, and a client for each."""
    kd, server_pub, users = curve_users(tmp_path, names)
    d = daemon_factory(
        *docker_args(
            engine, "--url=tcp://127.0.0.1:0", "--WorkerDaemon.curve=True", f"--WorkerDaemon.keys_dir={kd}", *extra
        )
    )
    return d, {name: d.client(curve=(server_pub, *users[name])) for name in names}


def refused(call, code: str) -> str:
    """The error text ``call`` fails with (what the user is shown), checking its code."""
    with pytest.raises(DaemonError) as e:
        call()
    assert e.value.code == code, e.value
    return str(e.value)


def start_refused(client: DaemonClient, session: str, code: str = P.Err.VOLUME, **content) -> str:
    msg = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": "print('never')", **content}, session)
    return refused(lambda: client.request(msg, timeout=TIMEOUT), code)


def volumes(client: DaemonClient, op: str, name: str = "") -> object:
    return client.call(P.Msg.VOLUMES, {"op": op, "name": name}, timeout=TIMEOUT)["result"]


def volumes_refused(client: DaemonClient, op: str, name: str) -> str:
    return refused(lambda: client.call(P.Msg.VOLUMES, {"op": op, "name": name}, timeout=TIMEOUT), P.Err.VOLUME)


def release(client: DaemonClient, session: str) -> None:
    client.call(P.Msg.RELEASE, session=session, timeout=TIMEOUT)


def bad_name(action: str, shown: str) -> str:
    return f"cannot {action} volume {shown}: a volume name is {VOLUME_NAME_RULE}"


def put_file(engine, volume: str, text: str) -> None:
    """Write /v/f into ``volume`` from outside jupyter-gpu, as the operator could."""
    mount = docker.types.Mount("/v", volume, type="volume")
    engine.client.containers.run(
        dockerd.IMAGE, ["sh", "-c", f"echo {text} > /v/f"], mounts=[mount], remove=True, network_mode="none"
    )


def session_containers(engine) -> list:
    return engine.client.containers.list(all=True, filters={"label": LABEL_SESSION})


# ----------------------------------------------------------------------------- 4. names that meet


def test_volume_names_of_two_users_never_meet_and_labels_say_whose_a_volume_is(
    volumes_made, engine, daemon_factory, tmp_path
):
    d, c = curve_daemon(engine, daemon_factory, tmp_path, ("alice", "alice-bob"))
    alice, ab = c["alice"], c["alice-bob"]

    # A volume from before: the old naming made alice's "bob-data" jupyter-gpu-alice-bob-data,
    # the very name of alice-bob's "data". Its labels say whose it is: alice-bob never gets it.
    legacy = engine.client.volumes.create(
        "jupyter-gpu-alice-bob-data", labels={LABEL_USER: "alice", LABEL_VOLUME: "bob-data"}
    )
    put_file(engine, legacy.name, "alices-old-secret")
    taken = (
        "cannot use volume 'data': this host already has a Docker volume 'jupyter-gpu-alice-bob-data' that is "
        "not yours (made outside jupyter-gpu, or by an older version that named volumes ambiguously); choose "
        "another name, or ask the operator"
    )
    assert start_refused(ab, "ab1", volumes=["data:/data"]) == f"could not start a worker: {taken}"
    assert volumes_refused(ab, "create", "data") == taken
    none = "you have no volume 'data' (`jupyter gpu volumes ls` lists yours)"
    assert volumes_refused(ab, "rm", "data") == none
    # A volume with alice-bob's labels copied onto it is not his either: its name is not his.
    engine.client.volumes.create("planted", labels={LABEL_USER: "alice-bob", LABEL_VOLUME: "data"})
    assert volumes(ab, "ls") == [] and volumes(ab, "du") == []
    assert sorted(v.name for v in engine.client.volumes.list() if v.name in (legacy.name, "planted")) == [
        legacy.name,
        "planted",
    ]
    assert printed(alice, "a0", "print('alice is served')") == "alice is served\n"
    # Alice cannot reach it either under a name with '-' in it: no name has one any more.
    assert start_refused(alice, "a1", volumes=["bob-data:/data"]) == "could not start a worker: " + bad_name(
        "mount", "'bob-data'"
    )
    for op, action in (("create", "create"), ("rm", "remove")):
        assert volumes_refused(alice, op, "bob-data") == bad_name(action, "'bob-data'")

    # Once the operator has dealt with the old volume, the names are alice-bob's and alice's own.
    legacy.remove()
    assert printed(ab, "ab1", "open('/data/f', 'w').write('ab'); print('saved')", volumes=["data:/data"]) == "saved\n"
    out = printed(alice, "a1", "import os; print(os.listdir('/data'))", volumes=["data:/data"])
    assert out == "[]\n"  # alice's own, empty "data"
    assert [(v["name"], v["docker_name"]) for v in volumes(ab, "ls")] == [("data", "jupyter-gpu-alice-bob-data")]
    assert [(v["name"], v["docker_name"]) for v in volumes(alice, "ls")] == [("data", "jupyter-gpu-alice-data")]
    assert printed(ab, "ab1", "print(open('/data/f').read())") == "ab\n"  # the daemon kept serving


# ----------------------------------------------------------------------------- 5. names and paths that walk


BAD_NAMES = [
    ("x/../../volumes/jupyter-gpu-bob-data", "'x/../../volumes/jupyter-gpu-bob-data'"),
    ("../jupyter-gpu-bob-data", "'../jupyter-gpu-bob-data'"),
    ("bob-data", "'bob-data'"),
    ("Data", "'Data'"),
    ("a.b", "'a.b'"),
    ("_x", "'_x'"),
    ("", "''"),
    ("data\n", "'data\\n'"),
    ("a" * 64, "'" + "a" * 40 + "'..."),
]


def test_a_volume_name_with_a_path_in_it_never_reaches_another_users_volume(
    volumes_made, engine, daemon_factory, tmp_path
):
    d, c = curve_daemon(engine, daemon_factory, tmp_path, ("alice", "bob"))
    alice, bob = c["alice"], c["bob"]
    assert printed(bob, "b1", "open('/data/f', 'w').write('bobs'); print('saved')", volumes=["data:/data"]) == "saved\n"
    release(bob, "b1")
    for name, shown in BAD_NAMES:
        for op, action in (("rm", "remove"), ("create", "create")):
            assert volumes_refused(alice, op, name) == bad_name(action, shown), (op, name)
        text = start_refused(alice, "a1", volumes=[f"{name}:/data"])
        assert text == "could not start a worker: " + bad_name("mount", shown), name
    not_text = {"op": "rm", "name": ["x/../y"]}  # the daemon reads a name as text
    assert refused(lambda: alice.call(P.Msg.VOLUMES, not_text), P.Err.VOLUME) == bad_name("remove", "\"['x/../y']\"")
    assert volumes(alice, "ls") == []
    # Bob's volume is whole, and the daemon serves him as before.
    assert [v.name for v in engine.client.volumes.list() if v.name == "jupyter-gpu-bob-data"] == [
        "jupyter-gpu-bob-data"
    ]
    assert printed(bob, "b2", "print(open('/data/f').read())", volumes=["data:/data:ro"]) == "bobs\n"


BAD_TARGETS = [
    ("data:relative", "'relative'", "it is not an absolute path"),
    ("data:/", "'/'", "that is the container's root"),
    (
        "data:/run/jupyter-gpu",
        "'/run/jupyter-gpu'",
        "it is on, above or under /run/jupyter-gpu, which the worker needs",
    ),
    ("data:/run", "'/run'", "it is on, above or under /run/jupyter-gpu, which the worker needs"),
    ("data:/run/jupyter-gpu-bulk/x", "'/run/jupyter-gpu-bulk/x'", "it is on, above or under /run/jupyter-gpu-bulk"),
    ("data:/opt", "'/opt'", "it is on, above or under /opt/jupyter-gpu/kernel_worker, which the worker needs"),
    (
        "data:/opt/jupyter-gpu/kernel_worker",
        "'/opt/jupyter-gpu/kernel_worker'",
        "it is on, above or under /opt/jupyter-gpu/kernel_worker, which the worker needs",
    ),
    ("data:/opt/notebook-site", "'/opt/notebook-site'", "it is on, above or under /opt/notebook-site"),
    ("data:/etc/hosts", "'/etc/hosts'", "it is on, above or under /etc/hosts"),
    ("data:/data/../run/jupyter-gpu", "'/data/../run/jupyter-gpu'", "'.' and '..' are not allowed in it"),
    ("data:/data/./x", "'/data/./x'", "'.' and '..' are not allowed in it"),
    ("data:/proc/self", "'/proc/self'", "/proc is the kernel's"),
    ("data:/dev", "'/dev'", "/dev is the kernel's"),
    ("data://data", "'//data'", "it has an empty part or a character outside the allowed ones"),
    ("data:/my data", "'/my data'", "it has an empty part or a character outside the allowed ones"),
    ("data:/" + "x" * 250, "'/" + "x" * 39 + "'...", "it is too long"),
]


def test_a_mount_target_over_the_workers_own_mounts_or_outside_the_rules_is_refused(
    volumes_made, engine, daemon_factory
):
    d: Daemon = daemon_factory(*docker_args(engine))
    client = d.client()
    before = {v.name for v in engine.client.volumes.list()}
    for spec, shown, why in BAD_TARGETS:
        text = start_refused(client, "nosy", volumes=[spec])
        assert text.startswith(f"could not start a worker: cannot mount volume 'data' at {shown}: {why}"), text
        assert text.endswith(f"; use {MOUNT_PATH_RULE}"), text
    unreadable = {
        "data:/data:rw:ro": "cannot read --volume 'data:/data:rw:ro': write NAME:/path or NAME:/path:ro",
        "data:/da:ta": "cannot read --volume 'data:/da:ta': write NAME:/path or NAME:/path:ro",
        "data": "cannot read --volume 'data': write NAME:/path or NAME:/path:ro",
    }
    for spec, why in unreadable.items():
        assert start_refused(client, "nosy", volumes=[spec]) == f"could not start a worker: {why}"
    assert start_refused(client, "nosy", volumes=["data:/data", 5]) == (
        "could not start a worker: cannot read --volume '5': write NAME:/path or NAME:/path:ro"
    )
    assert start_refused(client, "nosy", volumes="data:/data") == (
        "could not start a worker: volumes must be a list of at most 32 NAME:/path entries"
    )
    assert start_refused(client, "nosy", volumes=["data:/data", "other:/data/"]) == (
        "could not start a worker: two volumes on one path: /data, /data"
    )
    # Nothing was made or started for any of them; the same volume at a plain path works.
    assert {v.name for v in engine.client.volumes.list()} == before
    assert session_containers(engine) == []
    assert printed(client, "fine", "print(open('/mnt/data/x', 'w').write('ok'))", volumes=["data:/mnt/data/"]) == "2\n"


# ----------------------------------------------------------------------------- 13. privileges and images

STATUS = "print(open('/proc/self/status').read()); import os; print('ids', os.getuid(), os.getgid())"


def test_cells_run_without_capabilities_or_new_privileges_and_only_allowed_images(volumes_made, engine, daemon_factory):
    d = daemon_factory(*docker_args(engine, f"--DockerBackend.allowed_images={dockerd.IMAGE_OLDPICKLE}"))
    client = d.client()
    out = printed(client, "s1", STATUS)
    assert "CapEff:\t0000000000000000\n" in out and "CapBnd:\t0000000000000000\n" in out
    assert "NoNewPrivs:\t1\n" in out
    assert f"ids {os.getuid()} {os.getgid()}\n" in out  # the daemon's own uid: it owns the shared directories
    refusal = (
        f"could not start a worker: image '{dockerd.IMAGE_NOZMQ}' is not allowed on this GPU host: use one of "
        f"'{dockerd.IMAGE}', '{dockerd.IMAGE_OLDPICKLE}' (the operator's DockerBackend.allowed_images)"
    )
    assert start_refused(client, "s2", P.Err.WORKER_START, image=dockerd.IMAGE_NOZMQ) == refusal
    assert [c.labels[LABEL_SESSION] for c in session_containers(engine)] == ["s1"]  # nothing started for it
    walk = "x/../../containers/json"
    assert start_refused(client, "s2", P.Err.WORKER_START, image=walk) == (
        f"could not start a worker: bad image name '{walk}': write a Docker image reference such as "
        "pytorch-cuda:2.4 or registry.example:5000/team/image:tag"
    )
    # The default image needs no listing; the daemon kept serving the first session.
    assert "ok\n" == printed(client, "s3", "print('ok')", image=dockerd.IMAGE)
    assert printed(client, "s1", "print('still here')") == "still here\n"


@pytest.mark.skipif(os.getuid() != 0, reason="a daemon can give its workers' directories to another uid only as root")
def test_cells_as_another_uid_get_their_directories_and_volumes_but_no_capabilities(
    volumes_made, engine, daemon_factory
):
    d = daemon_factory(*docker_args(engine, "--DockerBackend.user=65534:65534", "--DockerBackend.cap_add=SYS_PTRACE"))
    client = d.client()
    out = printed(client, "nobody", STATUS + "\nopen('/data/f', 'w').write('x')", volumes=["data:/data"])
    assert "ids 65534 65534\n" in out
    # SYS_PTRACE is in the bounding set, yet a non-root cell holds no capability at all.
    assert "CapEff:\t0000000000000000\n" in out and "CapBnd:\t0000000000080000\n" in out
    assert "NoNewPrivs:\t1\n" in out
    assert printed(client, "nobody", "import os; print(os.stat('/data/f').st_uid)") == "65534\n"
    assert printed(client, "other", "print('fine')") == "fine\n"


@pytest.mark.parametrize(
    "tamper, why",
    [
        (lambda r, gpus: {**r, "gpus": gpus}, "it was given GPUs"),  # claim every GPU on the host
        (lambda r, gpus: {**r, "user": "someone-else"}, "it was started for user"),  # become another user
    ],
)
def test_a_tampered_record_is_not_adopted(engine, daemon_factory, tamper, why):
    import json

    args = docker_args(engine, "--simulate-gpus=H100:1,A100-80GB:2")
    d = daemon_factory(*args)
    client = d.client()
    assert printed(client, "held", "print('x')", gpu="A100-80GB") == "x\n"
    every_gpu = [g["uuid"] for g in client.call(P.Msg.STATUS)["gpus"]]
    d.kill()
    record = os.path.join(default_state_dir(d.connection_file), "records", "held.json")
    with open(record) as f:
        tampered = tamper(json.load(f), every_gpu)
    with open(record, "w") as f:
        json.dump(tampered, f)

    d2 = daemon_factory(*args)
    d2.log.wait_for(f"not adopting the worker of session held: {why}", timeout=30)
    d2.log.wait_for("removing leftover worker of session held", timeout=30)
    assert [c for c in engine.client.containers.list(all=True) if c.labels.get(LABEL_SESSION) == "held"] == []
    other = d2.client()
    assert all(g["session"] is None for g in other.call(P.Msg.STATUS)["gpus"])
    assert printed(other, "next", "print('fine')", gpu="H100") == "fine\n"
