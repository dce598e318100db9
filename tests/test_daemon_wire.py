"""Junk sent straight to the daemon's socket gets an error reply, and everyone else
keeps working."""

from __future__ import annotations

import re
import time

import pytest
import zmq
from support.daemons import printed
from support.wire import RawPeer, header

from jupyter_gpu.client import DaemonClient, DaemonError
from kernel_worker import protocol as P


@pytest.fixture
def raw(daemon):
    """A bare DEALER on the daemon's socket, plus helpers to send frames and read the reply."""
    peer = RawPeer(daemon.url, daemon.key)
    yield peer.exchange, peer.signer, header
    peer.close()


def test_malformed_messages_get_error_replies_while_a_session_keeps_working(daemon, raw):
    exchange, signer, header = raw
    good = daemon.client()
    assert printed(good, "keeper", "kept = 41") == ""

    cases = [
        ([b"not a jupyter-gpu message"], P.Err.BAD_MESSAGE, ""),
        ([P.DELIM], P.Err.BAD_MESSAGE, ""),
        ([P.DELIM, b"0" * 64, header(id="m2")], P.Err.BAD_SIGNATURE, "m2"),
        ([P.DELIM, signer.sign(b"[1,2]"), b"[1,2]"], P.Err.BAD_MESSAGE, ""),
        ([P.DELIM, signer.sign(b"\xff\xfe"), b"\xff\xfe"], P.Err.BAD_MESSAGE, ""),
        ([P.DELIM, signer.sign(h := header(id="m3", v=99)), h], P.Err.VERSION, "m3"),
        ([P.DELIM, signer.sign(h := header(id="m4", type="rm -rf")), h], P.Err.UNKNOWN_TYPE, "m4"),
        ([P.DELIM, signer.sign(h := header(id="m5", type="ready")), h], P.Err.UNKNOWN_TYPE, "m5"),
        ([P.DELIM, signer.sign(h := header(id="m6", frames=[10])), h, b"123"], P.Err.BAD_MESSAGE, "m6"),
        ([P.DELIM, signer.sign(h := header(id="m7", session="../../etc")), h], P.Err.BAD_MESSAGE, "m7"),
        ([P.DELIM, signer.sign(h := header(id="m8", content=[])), h], P.Err.BAD_MESSAGE, "m8"),
        (
            [
                P.DELIM,
                signer.sign(
                    h := header(
                        id="m9",
                        type="execute",
                        session="s9",
                        frames=[0],
                        content={"code": "", "bulk": {"0": {"file": "../../x", "size": 1}}},
                    )
                ),
                h,
                b"",
            ],
            P.Err.BAD_MESSAGE,
            "m9",
        ),
    ]
    for frames, code, parent in cases:
        reply = exchange(frames)
        assert reply.type == P.Msg.FAIL, frames
        assert reply.content["code"] == code, (frames, reply.content)
        assert reply.parent == parent
        assert reply.content["message"]

    # The same valid message twice: the second is a replay.
    frames = [P.DELIM, signer.sign(h := header(id="m10")), h]
    assert exchange(frames).type == P.Msg.REPLY
    assert exchange(frames).content["code"] == P.Err.REPLAYED

    assert printed(good, "keeper", "print(kept + 1)") == "42\n"
    assert daemon.proc.poll() is None


def refused(call) -> DaemonError:
    """The daemon's refusal of ``call()``: a DaemonError proper, not a DaemonLost (its
    subclass), which no answer at all would raise."""
    with pytest.raises(DaemonError) as e:
        call()
    assert type(e.value) is DaemonError, repr(e.value)
    return e.value


def test_oversized_message_is_refused_with_a_reply(daemon_factory):
    d = daemon_factory("--WorkerDaemon.max_message_bytes=1048576")
    client = d.client()
    big = P.Message(P.Msg.EXECUTE, {"gpu": "cpu", "code": ""}, "s", buffers=[b"x" * (2 * 1024 * 1024)])
    e = refused(lambda: client.request(big, timeout=30))
    assert e.code == P.Err.TOO_LARGE
    assert re.fullmatch(r"message is \d+ bytes; this daemon accepts at most 1048576", str(e)), str(e)
    assert printed(client, "s", "print('fits')") == "fits\n"


def test_values_that_fail_to_load_on_the_worker_give_an_error_and_keep_it_alive(daemon):
    client = daemon.client()
    seen: list[P.Message] = []
    bogus = P.Message(
        P.Msg.EXECUTE,
        {"gpu": "cpu", "code": "print('should not run')", "values": [{"name": "v", "nframes": 1}]},
        "loader",
        buffers=[b"this is not a pickle"],
    )
    done = client.request(bogus, seen.append, timeout=30)
    assert done.type == P.Msg.DONE and not done.content["ok"]
    errors = [m for m in seen if m.type == P.Msg.ERROR]
    assert errors and "could not load the values" in errors[0].content["evalue"]
    assert not any(m.type == P.Msg.STREAM for m in seen)
    assert printed(client, "loader", "print('alive')") == "alive\n"


def test_wrong_key_is_refused(daemon):
    intruder = DaemonClient(daemon.url, b"not-the-key")
    try:
        e = refused(lambda: intruder.call(P.Msg.STATUS, timeout=30))
    finally:
        intruder.close()
    # The daemon's refusal arrives, signed with the key the intruder lacks.
    assert e.code == P.Err.BAD_SIGNATURE
    assert str(e) == (f"unreadable reply from the daemon at {daemon.url}: message signature does not match: wrong key?")
    daemon.log.wait_for(r"refused a request: message signature does not match: wrong key\?")


def test_loopback_tcp_works_and_other_addresses_are_refused(daemon_factory, tmp_path):
    d = daemon_factory("--url=tcp://127.0.0.1:0")
    assert d.url.startswith("tcp://127.0.0.1:")
    assert printed(d.client(), "over-tcp", "print('hi')") == "hi\n"
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernel_worker",
            "--url=tcp://0.0.0.0:5555",
            f"--WorkerDaemon.connection_file={tmp_path}/other.json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "refusing to listen on tcp://0.0.0.0:5555" in out.stderr
    assert "--WorkerDaemon.curve=True" in out.stderr  # says how to do it properly


@pytest.mark.parametrize("backend_args", [[]], indirect=False)
def test_a_flooding_client_slows_only_itself(daemon):
    flooder = zmq.Context.instance().socket(zmq.DEALER)
    flooder.linger = 0
    flooder.sndhwm = flooder.rcvhwm = 0  # no limit on our side: the daemon must cope
    flooder.connect(daemon.url)
    signer = P.Signer(daemon.key)
    n = 20_000
    flood = [P.pack(P.Message(P.Msg.STATUS, {}), signer) for _ in range(n)]
    polite = daemon.client()
    polite.call(P.Msg.PING)
    try:
        t0 = time.monotonic()
        for frames in flood:
            flooder.send_multipart(frames)  # and read no reply until the polite client is done
        for _ in range(20):
            polite.call(P.Msg.PING, timeout=30)
        polite_s = time.monotonic() - t0
        answered = 0
        while flooder.poll(0):
            flooder.recv_multipart()
            answered += 1
        # Ordering, not a stopwatch: the polite client's 20 round trips were all served
        # while the flood was still being answered, in a small part of the flood's time.
        assert answered < n, "the polite client waited for the whole flood"
        while answered < n:
            assert flooder.poll(60_000), f"the daemon answered {answered} of {n} flooding requests"
            flooder.recv_multipart()
            answered += 1
        flood_s = time.monotonic() - t0
        assert polite_s < flood_s / 3, (polite_s, flood_s)
        assert printed(polite, "polite", "print('still fine')") == "still fine\n"
    finally:
        flooder.close(0)


def test_a_request_whose_handler_fails_costs_one_error_reply_not_the_loop(daemon_factory, backend_args, tmp_path):
    # An operator's mistake the snapshot store meets at every request: its root is under a file.
    (tmp_path / "a-file").write_text("")
    daemon = daemon_factory(f"--Snapshots.root={tmp_path}/a-file/snapshots", *backend_args)
    peer = RawPeer(daemon.url, daemon.key)
    exchange, signer = peer.exchange, peer.signer
    good = daemon.client()
    assert printed(good, "steady", "kept = 1") == ""
    for i in range(3):  # the same fault again and again: each costs its own reply
        h = header(id=f"bad{i}", type="snapshot", session="steady", content={"op": "list"})
        reply = exchange([P.DELIM, signer.sign(h), h])
        assert reply.type == P.Msg.FAIL and reply.parent == f"bad{i}"
        assert reply.content["code"] == P.Err.BAD_MESSAGE
        assert reply.content["message"].startswith("daemon could not handle snapshot: [Errno 17] File exists: ")
    daemon.log.wait_for(r"error handling snapshot")
    assert printed(good, "steady", "print(kept + 1)") == "2\n"
    h = header(id="fine", type="spend", content={"since": 0})
    assert exchange([P.DELIM, signer.sign(h), h]).type == P.Msg.REPLY
    assert daemon.proc.poll() is None
    peer.close()
