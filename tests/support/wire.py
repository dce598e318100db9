"""A bare peer on a daemon's socket: frames exactly as a test writes them, signed or not,
and the daemon's replies read back, for attacks and junk no real client would send."""

from __future__ import annotations

import json

import zmq

from kernel_worker import protocol as P

REPLY_TIMEOUT_MS = 20_000


class RawPeer:
    def __init__(self, url: str, key: bytes):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url)
        self.key = key
        self.signer = P.Signer(key)

    def reply(self) -> P.Message:
        assert self.sock.poll(REPLY_TIMEOUT_MS), "the daemon did not answer"
        _, rest = P.split_routing(self.sock.recv_multipart())
        return P.unpack(rest, P.Signer(self.key))

    def exchange(self, frames: list) -> P.Message:
        self.sock.send_multipart(frames)
        return self.reply()

    def close(self) -> None:
        self.sock.close(0)


def header(**over) -> bytes:
    """A valid request header (a status request unless ``over`` says otherwise)."""
    h = {"v": 1, "type": "status", "id": "m1", "parent": "", "session": "", "frames": [], "content": {}}
    h.update(over)
    return json.dumps(h).encode()
