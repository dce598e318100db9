"""Fuzzing the daemon's receiving path through its real socket, for a bounded time.

Every message, however malformed, must get exactly one reply (an error, unless it is a
valid request) and never crash or stall the daemon; a session running beside the fuzzer
keeps working. Cases that once broke something live on in test_daemon_wire.py.
"""

from __future__ import annotations

import json

import pytest
import zmq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from support.daemons import printed

from kernel_worker import protocol as P

MAX_EXAMPLES = 300

# JSON-ish values for header fields, including the wrong types.
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
types = st.one_of(st.sampled_from(sorted(P.CLIENT_REQUESTS | P.EXECUTOR_REPLIES)), st.text(max_size=20))
contents = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "gpu": st.one_of(st.sampled_from(["cpu", "any", "H100", "H100:2", "A100|H100", "x:y:z", ""]), values),
            "code": st.one_of(st.just("1 + 1"), values),
            "names": values,
            "values": values,
            "bulk": values,
            "timeout": values,
            "op": st.one_of(st.sampled_from(["ls", "rm", "create"]), values),
        },
    ),
    values,
)


@st.composite
def messages(draw):
    header = {
        "v": draw(st.one_of(st.just(P.PROTOCOL_VERSION), values)),
        "type": draw(types),
        "id": draw(st.one_of(st.text(alphabet="abcdef0123456789", min_size=1, max_size=32), values)),
        "parent": draw(st.one_of(st.just(""), values)),
        "session": draw(st.one_of(st.sampled_from(["fuzz-a", "fuzz-b"]), values)),
        "content": draw(contents),
    }
    buffers = draw(st.lists(st.binary(max_size=64), max_size=3))
    header["frames"] = draw(st.one_of(st.just([len(b) for b in buffers]), values))
    raw = json.dumps(header).encode() if draw(st.booleans()) else draw(st.binary(max_size=200))
    sign = draw(st.sampled_from(["good", "bad", "missing"]))
    return raw, buffers, sign


@pytest.fixture
def fuzz_socket(daemon):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.url)
    yield sock
    sock.close(0)


@pytest.mark.parametrize("backend_args", [[]], indirect=False)
def test_daemon_survives_fuzzed_requests(daemon, fuzz_socket):
    signer = P.Signer(daemon.key)
    keeper = daemon.client()
    assert printed(keeper, "keeper", "n = 0") == ""
    sent = {"n": 0}
    explicit = 3  # the @example cases below

    deep_content = json.dumps(
        {
            "v": 1,
            "type": "status",
            "id": "deep",
            "parent": "",
            "session": "",
            "frames": [],
            "content": {"x": json.loads("[" * 40 + "]" * 40)},
        }
    ).encode()
    big_frame = b"\0" * (80 * 1024 * 1024)

    # No example database and no shrinking: every run sends the explicit cases, then
    # MAX_EXAMPLES generated ones, each exactly once.
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    @given(messages())
    @example((b"[" * 100_000 + b"]" * 100_000, [], "missing"))  # once a RecursionError in the pump
    @example((deep_content, [], "good"))  # parses, but nests deeper than any real header
    @example((json.dumps({"v": 1, "frames": [len(big_frame)]}).encode(), [big_frame], "bad"))  # a big unsigned frame
    def one(case):
        raw, buffers, sign = case
        sig = {"good": signer.sign(raw), "bad": b"0" * 64, "missing": b""}[sign]
        assert not fuzz_socket.poll(0), "a reply nobody asked for (a second reply to the previous message?)"
        fuzz_socket.send_multipart([P.DELIM, sig, raw, *buffers])
        sent["n"] += 1
        # Exactly one reply per message, and soon; an EXECUTE that starts a worker may also
        # stream, so read until a final reply.
        while True:
            assert fuzz_socket.poll(20_000), f"no reply to {raw[:120]!r}"
            reply_frames = fuzz_socket.recv_multipart()
            _, rest = P.split_routing(reply_frames)
            reply = P.unpack(rest, P.Signer(daemon.key))
            if reply.type in P.FINAL_REPLIES:
                break
        if sign != "good":  # nothing unsigned or wrongly signed is ever served
            assert reply.type == P.Msg.FAIL, (raw[:120], reply)
            assert reply.content["code"] in (P.Err.BAD_SIGNATURE, P.Err.BAD_MESSAGE), (raw[:120], reply.content)

    one()
    assert sent["n"] == explicit + MAX_EXAMPLES
    assert daemon.proc.poll() is None
    assert printed(keeper, "keeper", "n += 1\nprint(n)") == "1\n"  # the session kept its namespace
