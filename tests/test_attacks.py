"""Attacks on the daemon, performed for real against a real daemon (and a real dockerd
where the `daemon` fixture runs on both backends). Each must fail with a clear error
while the daemon keeps serving another session."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.daemons import printed, start_daemon
from support.wire import RawPeer, header

from jupyter_gpu.client import DaemonClient, DaemonError
from kernel_worker import protocol as P
from kernel_worker.daemon.paths import default_state_dir


def _execute(client: DaemonClient, session: str, code: str, **content) -> P.Message:
    return client.request(P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": code, **content}, session), timeout=60)


def _fails(call, code: str, *words: str) -> str:
    with pytest.raises(DaemonError) as e:
        call()
    assert e.value.code == code, e.value
    for w in words:
        assert w in str(e.value), e.value
    return str(e.value)


# ----------------------------------------------------------------------------- 1. session ids


@pytest.mark.parametrize("sid", [".", "..", "...", ".hidden", "-x", "a/b", "a.b", "x" * 129])
def test_a_session_id_that_is_not_a_plain_name_is_refused_and_nothing_is_removed(daemon, sid):
    state = Path(default_state_dir(daemon.connection_file))
    keeper = daemon.client()
    assert _execute(keeper, "keeper", "kept = 1").content["ok"]
    for type in (P.Msg.EXECUTE, P.Msg.RELEASE, P.Msg.PULL):
        msg = P.Message(type, {"gpu": "cpu", "code": "1"}, sid)
        text = _fails(lambda: keeper.request(msg, timeout=30), P.Err.BAD_MESSAGE, "is not allowed")
        assert "letters, digits, '_' or '-', starting with a letter or digit" in text
    assert (state / "daemon.key").is_file() and (state / "ledger.sqlite").is_file()
    assert printed(keeper, "keeper", "print(kept + 1)") == "2\n"


@pytest.mark.parametrize("backend_args", [[]], indirect=False)
def test_a_symlink_where_a_session_directory_goes_is_never_followed(daemon, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    bulk = tmp_path / "bulk"  # the test daemon's bulk_root
    (bulk / "planted").symlink_to(victim)
    client = daemon.client()
    _fails(lambda: _execute(client, "planted", "1"), P.Err.WORKER_START, "leads outside")
    client.request(P.Message(P.Msg.RELEASE, {}, "planted"), timeout=30)
    assert (victim / "precious").read_text() == "keep me"
    assert printed(client, "other", "print('fine')") == "fine\n"


# ----------------------------------------------------------------------------- 2. process backend, several users


def test_curve_on_the_process_backend_needs_the_single_tenant_flag(tmp_path):
    keys_dir = tmp_path / "keys"
    init = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu.cli", "keys", "init", "--keys-dir", str(keys_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel_worker",
            "--url=tcp://127.0.0.1:0",
            "--WorkerDaemon.curve=True",
            f"--WorkerDaemon.keys_dir={keys_dir}",
            f"--WorkerDaemon.connection_file={tmp_path}/d.json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "refusing to serve CurveZMQ users on the process backend" in out.stderr
    assert "--backend docker" in out.stderr and "--WorkerDaemon.single_tenant=True" in out.stderr
    assert not (tmp_path / "d.json").exists()


def test_a_worker_never_sees_the_daemons_environment(daemon_factory, monkeypatch):
    monkeypatch.setenv("JGPU_TEST_SECRET", "hunter2")  # the daemon inherits it; its workers must not
    d = daemon_factory()
    client = d.client()
    code = "import os\nprint(os.environ.get('JGPU_TEST_SECRET'), 'PATH' in os.environ)"
    assert printed(client, "env", code) == "None True\n"


def test_a_worker_sees_its_own_socket_and_no_record_key_or_ledger(daemon):
    state = default_state_dir(daemon.connection_file)
    client = daemon.client()
    code = (
        "import os\n"
        "here = os.path.dirname(os.environ['JUPYTER_GPU_ENDPOINT'][len('ipc://'):])\n"
        f"print(sorted(os.listdir(here)), os.path.exists({state!r}))"
    )
    # The record lives outside anything a worker is given; a container never has the state dir.
    docker = client.call(P.Msg.HELLO)["backend"] == "docker"
    assert printed(client, "nosy", code) == f"['worker.sock'] {not docker}\n"
    assert printed(client, "other", "print('fine')") == "fine\n"


# ----------------------------------------------------------------------------- 3. and 11. directories


def _refused_start(tmp_path: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "kernel_worker", f"--WorkerDaemon.connection_file={tmp_path}/d.json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert not (tmp_path / "d.json").exists()
    return out.stderr


def test_a_planted_directory_is_refused_by_name(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "bulk-link"
    link.symlink_to(elsewhere)
    err = _refused_start(tmp_path, f"--WorkerDaemon.bulk_root={link}", f"--url=ipc://{tmp_path}/a.sock")
    assert f"refusing to use {link}: it is a symbolic link" in err

    open_dir = tmp_path / "state-open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    (open_dir / "daemon.key").write_text("planted-key")
    err = _refused_start(tmp_path, f"--WorkerDaemon.state_dir={open_dir}", f"--url=ipc://{tmp_path}/b.sock")
    assert f"refusing to use {open_dir}: its mode is 755, readable by others" in err

    if os.getuid() == 0:  # as root (CI), a directory another user made first
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        err = _refused_start(tmp_path, f"--WorkerDaemon.state_dir={theirs}", f"--url=ipc://{tmp_path}/c.sock")
        assert f"refusing to use {theirs}: it belongs to uid 65534" in err


def test_the_socket_directory_is_private_and_the_socket_is_the_users_alone(tmp_path, runtime_dir):
    where = tmp_path / "fresh" / "run"
    d = start_daemon(tmp_path, f"--url=ipc://{where}/daemon.sock")
    try:
        assert stat.S_IMODE(where.stat().st_mode) == 0o700
        assert stat.S_IMODE((where / "daemon.sock").stat().st_mode) == 0o600
        assert printed(d.client(), "ok", "print('ok')") == "ok\n"
    finally:
        d.stop()


# ----------------------------------------------------------------------------- 7. and 8. poison messages


@pytest.mark.parametrize("backend_args", [[]], indirect=False)
def test_deeply_nested_headers_get_an_error_reply_and_never_stall_the_daemon(daemon):
    peer = RawPeer(daemon.url, daemon.key)
    keeper = daemon.client()
    try:
        assert _execute(keeper, "keeper", "kept = 1").content["ok"]
        deep = b"[" * 200_000 + b"]" * 200_000  # no key needed: refused before the signature
        for _ in range(50):
            peer.sock.send_multipart([P.DELIM, b"0" * 64, deep])
        for _ in range(50):
            reply = peer.reply()
            assert reply.content["code"] == P.Err.BAD_MESSAGE
            assert reply.content["message"] == "header nests deeper than 32 levels"
        nested: object = 1
        for _ in range(40):  # signed, and within what json parses: still refused
            nested = [nested]
        h = header(id="deep", type="execute", session="s", content={"code": "", "x": nested})
        reply = peer.exchange([P.DELIM, peer.signer.sign(h), h])
        assert reply.parent == "deep" and reply.content["message"] == "header nests deeper than 32 levels"
        for _ in range(20):
            assert set(keeper.call(P.Msg.PING, timeout=5)) == {"incarnation"}
        assert printed(keeper, "keeper", "print(kept)") == "1\n"
    finally:
        peer.close()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_one_huge_unsigned_frame_is_cut_off_before_it_is_buffered(daemon_factory):
    d = daemon_factory(f"--WorkerDaemon.max_message_bytes={1024**2}")
    keeper = d.client()
    assert printed(keeper, "keeper", "print('before')") == "before\n"
    before = _peak_rss(d.proc.pid)
    peer = RawPeer(d.url, d.key)
    try:
        huge = bytearray(256 * 1024**2)
        peer.sock.send_multipart([P.DELIM, b"0" * 64, header(frames=[len(huge)]), huge], copy=False)
        # A merely oversized request still gets its reply, on a connection of its own.
        big = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": ""}, "s", buffers=[b"x" * (2 * 1024**2)])
        _fails(lambda: d.client().request(big, timeout=30), P.Err.TOO_LARGE, "this daemon accepts at most 1048576")
        assert printed(keeper, "keeper", "print('after')") == "after\n"
        assert _peak_rss(d.proc.pid) - before < 64 * 1024**2
    finally:
        peer.close()


# ----------------------------------------------------------------------------- 9. and 10. bounded, filtered


def _send(client: DaemonClient, session: str, code: str = "1", gpu: str = "cpu", **content) -> P.Message:
    msg = P.Message(P.Msg.EXECUTE, {"gpu": gpu, "code": code, **content}, session)
    client.send(msg)
    return msg


def _next(client: DaemonClient, timeout: float = 60) -> P.Message:
    m = client._recv(timeout)
    assert m is not None, "no reply"
    return m


def test_sessions_and_queue_places_per_user_are_bounded_by_default(daemon_factory):
    d = daemon_factory("--simulate-gpus=H100:1")
    client = d.client()
    assert _execute(client, "holder", "1", gpu="H100").content["ok"]
    queued = [_send(client, f"q{i}", gpu="H100") for i in range(4)]
    seen = {m.id: [] for m in queued}
    while any(not v for v in seen.values()):
        m = _next(client)
        assert m.type == P.Msg.QUEUED, m
        seen[m.parent].append(m)
    _fails(lambda: _execute(client, "q4", "1", gpu="H100"), P.Err.UNAVAILABLE, "max_queued_per_user=4")
    for i in range(3):
        assert _execute(client, f"cpu{i}", "1").content["ok"]
    # holder + 4 queued + 3 cpu = 8 sessions: the default limit
    _fails(lambda: _execute(client, "one-too-many", "1"), P.Err.UNAVAILABLE, "max_sessions_per_user=8")
    assert printed(client, "cpu0", "print('still served')") == "still served\n"


def test_the_notebook_name_is_bounded_in_status_and_ledger(daemon_factory):
    d = daemon_factory()
    client = d.client()
    long = "nb/" + "x" * 1_000_000 + "\x1b[31m"
    for i in range(20):
        assert _execute(client, "named", f"v = {i}", notebook=long).content["ok"]
    st = client.call(P.Msg.STATUS)
    assert [len(s["notebook"]) for s in st["sessions"]] == [512]
    spend = client.call(P.Msg.SPEND, {"since": 0})  # also: every record is committed by now
    assert [len(nb["notebook"]) for nb in spend["notebooks"]] == [512]
    assert "\x1b" not in spend["notebooks"][0]["notebook"]
    ledger = Path(default_state_dir(d.connection_file)) / "ledger.sqlite"
    db = sqlite3.connect(ledger)
    assert db.execute("SELECT COUNT(*), MAX(LENGTH(notebook)), MAX(LENGTH(detail)) FROM records").fetchone() == (
        20,
        512,
        pytest.approx(1500, abs=1000),  # a record is its figures and that name, never the megabyte
    )
    db.close()


def test_others_queue_places_show_whose_but_not_their_session_ids(daemon_factory, tmp_path):
    from support.curve import curve_users

    kd, server_pub, users = curve_users(tmp_path, ("alice", "bob"))
    d = daemon_factory(
        "--simulate-gpus=H100:1",
        "--url=tcp://127.0.0.1:0",
        "--WorkerDaemon.curve=True",
        "--WorkerDaemon.single_tenant=True",
        f"--WorkerDaemon.keys_dir={kd}",
    )
    alice, bob = (DaemonClient(d.url, b"", curve=(server_pub, *users[n])) for n in ("alice", "bob"))
    d.clients += [alice, bob]
    assert _execute(alice, "alice-nb", "1", gpu="H100").content["ok"]
    _send(bob, "bob-secret-session", gpu="H100")
    assert _next(bob).type == P.Msg.QUEUED
    assert alice.call(P.Msg.STATUS)["queue"] == [{"session": None, "request": "H100", "user": "bob"}]
    assert bob.call(P.Msg.STATUS)["queue"] == [{"session": "bob-secret-session", "request": "H100", "user": "bob"}]
    assert printed(alice, "alice-nb", "print('served')") == "served\n"
