"""Large values as chunk streams (kernel_worker/chunks.py) through a daemon "on another
host" (its bulk root in a mount namespace of its own, so nothing goes by file): a value
shipped and pulled back arrives whole and writable, as chunks both ways; chunks that went
to a worker replaced before their cell are sent again; and hostile chunks from a bare
peer are dropped before they are held or relayed, while the daemon serves on."""

from __future__ import annotations

import json
import os
import re

import pytest
from support.shells import run
from support.wire import RawPeer, header

from kernel_worker import chunks
from kernel_worker import protocol as P

MIB = 1024 * 1024


@pytest.fixture
def chunk_spy(monkeypatch):
    """What this process sent as chunks (``sent``: buffer sizes per split) and received
    (``received``: chunk sizes), through the client's use of chunks.split and Assembler.add."""
    seen: dict = {"sent": [], "received": []}
    split, add = chunks.split, chunks.Assembler.add

    def spied_split(msg, at_least=chunks.CHUNK_MIN):  # noqa: ANN001, ANN202
        out = split(msg, at_least)
        if out:
            seen["sent"].append([len(c.buffers[0]) for c in out])
        return out

    def spied_add(self, msg):  # noqa: ANN001, ANN202
        seen["received"].append(memoryview(msg.buffers[0].buffer).nbytes)
        return add(self, msg)

    monkeypatch.setattr(chunks, "split", spied_split)
    monkeypatch.setattr(chunks.Assembler, "add", spied_add)
    return seen


def test_a_large_value_travels_as_chunks_both_ways_and_arrives_writable(elsewhere_daemon, make_shell, chunk_spy):
    ip = make_shell(elsewhere_daemon)
    assert ip.run_cell(f"import numpy as np\nbig = np.arange({4 * MIB}, dtype=np.int64)", store_history=False).success
    result, cap = run(ip, "%%gpu cpu --pull back\nbig[0] = -1\nprint(int(big.sum()), big.flags.writeable)\nback = big")
    assert result.success, cap.stderr
    total = (4 * MIB) * (4 * MIB - 1) // 2
    assert cap.stdout == f"{total - 1} True\n"
    assert chunk_spy["sent"] == [[4 * MIB] * 8]  # 32 MiB as 8 chunks of 4 MiB, ahead of the cell
    assert chunk_spy["received"] == [4 * MIB] * 8  # and back
    back = ip.user_ns["back"]
    assert back.flags.writeable and back[0] == -1 and int(back[1:].sum()) == total
    back[1] = 7  # a buffer of its own, writable as a local array
    assert ip.user_ns["big"][0] == 0


@pytest.mark.daemon_args("--simulate-gpus=H100:1,A100-80GB:1")
def test_chunks_that_reached_a_replaced_worker_are_sent_again(elsewhere_daemon, make_shell, chunk_spy):
    """The session's idle H100 worker gets the chunks at once; the cell asks for an A100,
    so a new worker runs it, lacks the stream, and the notebook sends it again."""
    ip = make_shell(elsewhere_daemon)
    assert ip.run_cell("x = 1", store_history=False).success
    assert run(ip, "%%gpu H100\ny = x")[0].success
    assert ip.run_cell("import numpy as np\nbig = np.ones(2 * 1024 * 1024)", store_history=False).success
    result, cap = run(ip, "%%gpu A100-80GB\nprint(big.sum(), x)")
    assert result.success, cap.stderr
    assert cap.stdout == f"{2 * 1024 * 1024}.0 1\n"
    assert chunk_spy["sent"] == [[4 * MIB] * 4, [4 * MIB] * 4]  # 16 MiB, sent twice


def chunk(of: str = "m2", index=0, offset=0, size=8, data=(b"x" * 8,), session: str = "s1") -> list:
    """A CHUNK's frames, signed, with ``data`` as its frames."""
    head = header(
        type=P.Msg.CHUNK,
        id=f"c{abs(hash((of, index, offset, size, len(data)))):x}",
        session=session,
        frames=[len(d) for d in data],
        content={"of": of, "index": index, "offset": offset, "size": size},
    )
    return head, list(data)


def test_hostile_chunks_are_dropped_before_they_are_held_or_relayed(elsewhere_daemon):
    d = elsewhere_daemon
    peer = RawPeer(d.url, d.key)
    signer = P.Signer(d.key)
    bad = [
        (chunk(of="../x"), "a chunk names no valid message id"),
        (chunk(index=True), "a chunk's index, offset and size are integers"),
        (chunk(offset=-1), "a chunk out of bounds"),
        (chunk(offset=4), "a chunk out of bounds (index 0, 8 bytes at 4 of 8)"),
        (chunk(size=1 << 62), "a chunk out of bounds"),
        (chunk(index=1 << 20), "a chunk out of bounds"),
        (chunk(data=(b"x" * 4, b"y" * 4)), "a chunk carries exactly one frame"),
    ]
    for (head, data), why in bad:
        peer.sock.send_multipart([P.DELIM, signer.sign(head), head, *data])
        d.log.wait_for(f"dropped a chunk from a client of session s1: {why}".replace("(", r"\(").replace(")", r"\)"))
    # A request that names streams it cannot have is refused whole.
    head = header(
        type=P.Msg.EXECUTE,
        id="m2",
        session="s1",
        frames=[0],
        content={"gpu": "cpu", "code": "print(1)", "values": [], "chunked": {"3": 8}},
    )
    reply = peer.exchange([P.DELIM, signer.sign(head), head, b""])
    assert (reply.type, reply.content["code"], reply.content["message"]) == (
        P.Msg.FAIL,
        P.Err.BAD_MESSAGE,
        "bad streamed buffer references",
    )
    # Nothing was held for this client; the daemon serves on.
    status = d.client().call(P.Msg.STATUS)
    assert status["sessions"] == []
    assert json.loads(header())["type"] == "status"
    peer.close()


@pytest.mark.daemon_args("--WorkerDaemon.client_timeout=1", "--WorkerDaemon.reap_interval=0.2")
def test_a_stream_whose_request_never_comes_is_let_go(elsewhere_daemon):
    """A notebook killed between its chunks and its request: the daemon holds them for
    client_timeout, then drops them (nothing else depends on them)."""
    d = elsewhere_daemon
    peer = RawPeer(d.url, d.key)
    head, data = chunk(of="m9", size=8)
    signer = P.Signer(d.key)
    peer.sock.send_multipart([P.DELIM, signer.sign(head), head, *data])
    status = header(id="m10")
    assert peer.exchange([P.DELIM, signer.sign(status), status]).type == P.Msg.REPLY  # the chunk came before it
    peer.close()  # as a SIGKILLed kernel would: no request follows
    d.log.wait_for(r"dropped 8 held bytes of a stream for m9: its request never came", timeout=30)
    assert d.client().call(P.Msg.STATUS)["sessions"] == []


def test_a_received_buffer_is_faulted_in_beside_its_writer_and_keeps_what_it_wrote():
    """buffers.allocate faults a large buffer's pages in from a thread of its own while the
    receiver already writes into it: the writer's bytes survive (the thread only adds
    zero pages where none are yet), and the pages it never wrote are there too."""
    import threading

    from kernel_worker import buffers

    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * buffers.mmap.PAGESIZE / MIB

    before = resident_mib()
    mem = buffers.allocate(64 * MIB)
    pattern = bytes(range(256)) * 4096  # 1 MiB
    for off in range(0, 32 * MIB, MIB):  # the first half, racing the thread from the start
        mem[off : off + MIB] = pattern
    for t in threading.enumerate():
        if t.name == "jgpu-prefault":
            t.join(30)
    kernel = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    if buffers._MADVISE is not None and kernel >= (5, 14):  # MADV_POPULATE_WRITE
        assert resident_mib() - before >= 60  # the half never written was faulted in as well
    assert all(mem[off : off + MIB] == pattern for off in range(0, 32 * MIB, MIB))
    assert mem[32 * MIB :] == bytes(32 * MIB)


def test_the_daemon_keeps_chunk_memory_while_values_flow_and_gives_it_back_after(monkeypatch):
    """Streams.keep_freed_s: malloc keeps what relayed chunks took (no page faults for the
    next value's), and it goes back to the system once no chunk came or went for so long."""
    from traitlets.config import Config, LoggingConfigurable

    from kernel_worker.daemon import streams

    given: list[float] = []
    monkeypatch.setattr(streams.buffers, "keep_freed", lambda: True)
    monkeypatch.setattr(streams.buffers, "give_back", lambda: given.append(now))

    class Daemon(LoggingConfigurable):
        client_timeout = 30.0
        max_message_bytes = 1 << 30

    s = streams.Streams(Daemon(config=Config({"Streams": {"keep_freed_s": 5.0}})))
    assert s.keeping and s.last_chunk == 0.0
    for now in (1.0, 100.0):  # no chunk yet: nothing kept to give back
        s.expire(now)
    s.last_chunk = 100.0
    for now in (104.0, 105.5, 106.0, 300.0):
        s.expire(now)
    assert given == [105.5]  # once, after the last chunk's 5 s
    off = streams.Streams(Daemon(config=Config({"Streams": {"keep_freed_s": 0.0}})))
    assert not off.keeping  # malloc left as it is
