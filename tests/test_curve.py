"""CurveZMQ: authorised keys get in (as the user their key names), unknown keys get no
work out of the daemon, and users cannot touch each other's sessions."""

from __future__ import annotations

import pytest
import zmq.auth
from support.curve import cli, curve_users

from jupyter_gpu.client import DaemonClient, DaemonError, DaemonLost
from kernel_worker import keys
from kernel_worker import protocol as P


@pytest.fixture
def curve_daemon(daemon_factory, tmp_path):
    kd, server_pub, users = curve_users(tmp_path, ("alice", "bob", "ops"), strangers=("eve",))
    d = daemon_factory(
        "--url=tcp://127.0.0.1:0",
        "--WorkerDaemon.curve=True",
        "--WorkerDaemon.single_tenant=True",  # identities and ownership on the process backend
        f"--WorkerDaemon.keys_dir={kd}",
        "--WorkerDaemon.operators=ops",
        "--WorkerDaemon.max_sessions_per_user=1",
    )
    clients = []

    def client(name: str) -> DaemonClient:
        public, secret = users[name]
        c = DaemonClient(d.url, b"", heartbeat_interval=0.5, heartbeat_timeout=1.0, curve=(server_pub, public, secret))
        clients.append(c)
        return c

    yield d, client, kd, users
    for c in clients:
        c.close()


def execute(c: DaemonClient, session: str, code: str) -> P.Message:
    return c.request(P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": code}, session), timeout=30)


def test_curve_identities_and_cross_user_denial(curve_daemon):
    d, client, kd, users = curve_daemon
    alice, bob, ops = client("alice"), client("bob"), client("ops")
    assert execute(alice, "alices", "secret = 42").content["ok"]

    # Bob can do nothing with Alice's session, and learns nothing from trying.
    for msg in (
        P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": "print(secret)"}, "alices"),
        P.Message(P.Msg.PULL, {"names": ["secret"]}, "alices"),
        P.Message(P.Msg.INTERRUPT, {}, "alices"),
        P.Message(P.Msg.RELEASE, {}, "alices"),
        P.Message(P.Msg.COST, {}, "alices"),
    ):
        with pytest.raises(DaemonError, match="you have no session alices") as e:
            bob.request(msg, timeout=10)
        assert e.value.code == P.Err.NO_SESSION
    assert bob.call(P.Msg.STATUS, {"all": True})["sessions"] == []  # not an operator: only his own
    assert [s["user"] for s in alice.call(P.Msg.STATUS)["sessions"]] == ["alice"]
    assert [s["user"] for s in ops.call(P.Msg.STATUS, {"all": True})["sessions"]] == ["alice"]

    # Per-user limit: one session each.
    assert execute(bob, "bobs", "1").content["ok"]
    with pytest.raises(DaemonError, match="max_sessions_per_user=1"):
        execute(bob, "bobs-second", "1")

    # A key nobody authorised gets no answer at all; the daemon logs the refusal.
    with pytest.raises(DaemonLost, match="CURVE key is not authorised"):
        client("eve").call(P.Msg.STATUS, timeout=5)
    d.log.wait_for(r"refused a CURVE connection .* is not authorised", timeout=10)

    # Revoking takes effect without a restart, even on an open connection.
    assert cli("keys", "revoke", f"--key={users['bob'][0].decode()}", "--keys-dir", str(kd)).stdout.strip() == "revoked"
    with pytest.raises(DaemonLost):
        bob.call(P.Msg.STATUS, timeout=3)
    assert execute(alice, "alices", "print(secret)").content["ok"]


def test_one_daemon_keeps_users_volumes_apart(engine, daemon_factory, tmp_path):
    from support.daemons import docker_args

    kd = tmp_path / "keys"
    server_pub = keys.init(str(kd)).encode()
    creds = {}
    for name in ("alice", "bob"):
        zmq.auth.create_certificates(str(tmp_path), name)
        creds[name] = keys.load(str(tmp_path), name)
        keys.authorize(str(kd), creds[name][0].decode(), name)
    d = daemon_factory(
        *docker_args(engine, "--url=tcp://127.0.0.1:0", "--WorkerDaemon.curve=True", f"--WorkerDaemon.keys_dir={kd}")
    )

    def client(name: str) -> DaemonClient:
        return DaemonClient(d.url, b"", curve=(server_pub, *creds[name]))

    alice, bob = client("alice"), client("bob")
    try:
        run_ = {"gpu": "cpu", "volumes": ["data:/data"]}
        assert alice.request(
            P.Message(P.Msg.EXECUTE, {**run_, "code": "open('/data/f', 'w').write('a')"}, "a1"), timeout=60
        ).content["ok"]
        seen: list = []
        done = bob.request(
            P.Message(P.Msg.EXECUTE, {**run_, "code": "import os; print(os.listdir('/data'))"}, "b1"),
            seen.append,
            timeout=60,
        )
        assert done.content["ok"] and "[]\n" in [m.content.get("text") for m in seen]  # bob's own, empty "data"
        assert [v["user"] for v in bob.call(P.Msg.VOLUMES, {"op": "ls"})["result"]] == ["bob"]
        with pytest.raises(DaemonError, match="is mounted by running session"):
            alice.call(P.Msg.VOLUMES, {"op": "rm", "name": "data"})
    finally:
        for c in (alice, bob):
            c.call(P.Msg.RELEASE, session="a1" if c is alice else "b1")
            c.close()
        for v in engine.client.volumes.list():
            v.remove(force=True)


def test_magic_connects_over_curve(curve_daemon, make_shell, tmp_path):
    d, client, kd, users = curve_daemon
    server_pub = keys.load(str(kd))[0].decode()
    ip = make_shell(d)
    from support.shells import run

    result, cap = run(ip, f"%gpu connect {d.url} --server-key {server_pub} --client-key {tmp_path}/alice")
    assert result.success and f"connected to {d.url}: process backend" in cap.stdout, cap.stdout
    result, cap = run(ip, "x = 20\n")
    result, cap = run(ip, "%%gpu cpu\nprint('doubled', x * 2)")
    assert result.success and "doubled 40" in cap.stdout
    result, cap = run(ip, f"%gpu connect {d.url} --server-key {server_pub} --client-key {tmp_path}/nobody")
    assert "jupyter gpu keys init --client" in str(result.error_in_exec)
