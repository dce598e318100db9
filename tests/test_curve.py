"""CurveZMQ: authorised keys get in (as the user their key names), unknown keys get no
work out of the daemon, and users cannot touch each other's sessions."""

from __future__ import annotations

import re

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
        # A ping after 0.5 s of silence, and 5 s for its pong: a loaded machine answers
        # slowly, never that slowly, so a DaemonLost here means no answer was coming.
        public, secret = users[name]
        c = DaemonClient(d.url, b"", heartbeat_interval=0.5, heartbeat_timeout=5.0, curve=(server_pub, public, secret))
        clients.append(c)
        return c

    yield d, client, kd, users
    for c in clients:
        c.close()


def execute(c: DaemonClient, session: str, code: str) -> P.Message:
    return c.request(P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": code}, session), timeout=30)


def refused(call, code: str, message: str) -> None:
    """``call()`` fails with the daemon's refusal ``code`` and exactly ``message``: a
    DaemonError, not a DaemonLost (a subclass) that no answer at all would also raise."""
    with pytest.raises(DaemonError) as e:
        call()
    assert type(e.value) is DaemonError, repr(e.value)
    assert (e.value.code, str(e.value)) == (code, message)


def lost(call, url: str) -> None:
    """``call()`` gets no answer at all: the client's heartbeat gives up on the daemon."""
    with pytest.raises(DaemonLost) as e:
        call()
    assert e.value.code == P.Err.TIMEOUT
    assert str(e.value).startswith(f"lost contact with the jupyter-gpu daemon at {url}: no answer for ")
    assert str(e.value).endswith(" (or your CURVE key is not authorised there).")


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
        refused(lambda msg=msg: bob.request(msg, timeout=10), P.Err.NO_SESSION, "you have no session alices")
    assert bob.call(P.Msg.STATUS, {"all": True})["sessions"] == []  # not an operator: only his own
    assert [s["user"] for s in alice.call(P.Msg.STATUS)["sessions"]] == ["alice"]
    assert [s["user"] for s in ops.call(P.Msg.STATUS, {"all": True})["sessions"]] == ["alice"]

    # Per-user limit: one session each.
    assert execute(bob, "bobs", "1").content["ok"]
    refused(
        lambda: execute(bob, "bobs-second", "1"),
        P.Err.UNAVAILABLE,
        "you already hold 1 session(s), the most this host allows per user (max_sessions_per_user=1): "
        "`%gpu release` one first",
    )

    # A key nobody authorised gets no answer at all; the daemon logs the refusal.
    eve = users["eve"][0].decode()
    lost(lambda: client("eve").call(P.Msg.STATUS, timeout=60), d.url)
    d.log.wait_for(rf"refused a CURVE connection .*: key {re.escape(eve)} is not authorised", timeout=10)

    # Revoking takes effect without a restart, even on an open connection: the daemon drops
    # what bob sends from now on, and says so.
    assert bob.call(P.Msg.STATUS, timeout=30)["sessions"]  # the connection is open and answered
    assert cli("keys", "revoke", f"--key={users['bob'][0].decode()}", "--keys-dir", str(kd)).stdout.strip() == "revoked"
    lost(lambda: bob.call(P.Msg.STATUS, timeout=60), d.url)
    d.log.wait_for(r"dropped a request: its CURVE key was revoked", timeout=10)
    out: list[P.Message] = []
    done = alice.request(P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": "print(secret)"}, "alices"), out.append, 30)
    assert done.content["ok"] and [m.content["text"] for m in out if m.type == P.Msg.STREAM] == ["42\n"]


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
        with pytest.raises(DaemonError) as e:
            alice.call(P.Msg.VOLUMES, {"op": "rm", "name": "data"})
        assert type(e.value) is DaemonError and e.value.code == P.Err.VOLUME
        assert str(e.value).startswith("volume 'data' is mounted by running session(s) a1")
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
    assert run(ip, "x = 20\n")[0].success
    result, cap = run(ip, "%%gpu cpu\nprint('doubled', x * 2)")
    assert result.success and cap.stdout == "doubled 40\n"
    status = ip.magics_manager.registry["GPUMagics"].client.call(P.Msg.STATUS)
    assert [s["user"] for s in status["sessions"]] == ["alice"]  # as the user the key names
    result, cap = run(ip, f"%gpu connect {d.url} --server-key {server_pub} --client-key {tmp_path}/nobody")
    assert not result.success and "jupyter gpu keys init --client" in str(result.error_in_exec)
