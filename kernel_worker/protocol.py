"""The jupyter-gpu wire protocol: the one definition every side (notebook client,
daemon, executor) imports.

It needs only pyzmq and the standard library, because the executor runs inside
arbitrary user images.

A message on the wire is a list of ZeroMQ frames::

    [routing ids...] DELIM  signature  header  buffer_0 ... buffer_n

``header`` is small UTF-8 JSON (type, ids, session, frame sizes, content). The
signature is HMAC-SHA256 of the header under the daemon's (or the session's) key,
compared in constant time, with a bounded history of seen signatures as a replay
guard -- the way jupyter_client's ``Session`` signs. As in jupyter_client, the
binary buffers are not signed (hashing gigabytes would cost more than the
transfer); their sizes are, so frames cannot be dropped, added or resized
unnoticed, and the transport (ipc file permissions, an SSH tunnel) protects them.

Buffers are pickle protocol 5 out-of-band buffers; the daemon relays them as
ZeroMQ frames without ever looking inside. Buffers too big for a cheap relay may
instead travel through a shared-memory file ("bulk" buffers) that the daemon
names and the executor maps; see ``kernel_worker.bulk``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

PROTOCOL_VERSION = 1
DELIM = b"<JGPU1>"


class Msg:
    """Message types. Each direction accepts only its own subset (see below)."""

    # client -> daemon
    HELLO = "hello"
    EXECUTE = "execute"
    INTERRUPT = "interrupt"
    PULL = "pull"
    RELEASE = "release"
    STATUS = "status"
    COST = "cost"
    VOLUMES = "volumes"
    SPEND = "spend"
    PING = "ping"  # also: "is request R still coming?" and, with keepalive, "this kernel is alive"
    ATTACH = "attach"  # take over a session left by another kernel: its output so far, then live
    INPUT_REPLY = "input_reply"  # what the user typed at a remote input() / getpass() (or why nothing)
    SYNC = "sync"  # the notebook's directory to its workspace: a manifest, then the files the daemon lacks
    FETCH = "fetch"  # files from the workspace back to the notebook's directory
    PIP = "pip"  # install packages for the user's workers, on the daemon's host (pip's output streams back)
    SNAPSHOT = "snapshot"  # a notebook's namespace snapshots: take one now, list them, pick one to restore
    MIRROR = "mirror"  # a worker that cannot see the daemon's files: its workspace, before and after a cell
    CHUNK = "chunk"  # part of a large value, sent ahead of the message that names it (chunks.py); both ways
    # daemon -> client
    WELCOME = "welcome"
    QUEUED = "queued"
    STARTED = "started"
    REPLY = "reply"
    FAIL = "fail"
    PONG = "pong"
    PROGRESS = "progress"  # while a cell runs: elapsed, dollars so far, GPU readings
    ATTACHED = "attached"  # an ATTACH found its session: what follows is that session's cell output
    # executor -> daemon -> client (the cell's output, in order)
    STREAM = "stream"
    DISPLAY = "display_data"
    UPDATE_DISPLAY = "update_display_data"
    CLEAR = "clear_output"
    RESULT = "execute_result"
    ERROR = "error"
    DONE = "done"
    VALUES = "values"
    NEED = "need"  # the worker lacks values the request assumed it holds: nothing ran
    INPUT_REQUEST = "input_request"  # a remote cell called input() or getpass(): ask the notebook's user
    # executor <-> daemon only
    RESTORE = "restore"  # load a snapshot of a namespace (SNAPSHOT, to an executor: write one)
    FILE = "file"  # a piece of a snapshot's file, for a worker that cannot see the daemon's disk (filestream.py)
    READY = "ready"
    HEARTBEAT = "heartbeat"


CLIENT_REQUESTS = frozenset(
    {
        Msg.HELLO,
        Msg.EXECUTE,
        Msg.INTERRUPT,
        Msg.PULL,
        Msg.RELEASE,
        Msg.STATUS,
        Msg.COST,
        Msg.VOLUMES,
        Msg.SPEND,
        Msg.PING,
        Msg.ATTACH,
        Msg.INPUT_REPLY,
        Msg.SYNC,
        Msg.FETCH,
        Msg.PIP,
        Msg.SNAPSHOT,
        Msg.CHUNK,
    }
)
# Requests the daemon passes on to the session's executor.
EXECUTOR_REQUESTS = frozenset(
    {Msg.EXECUTE, Msg.PULL, Msg.PING, Msg.INPUT_REPLY, Msg.SNAPSHOT, Msg.RESTORE, Msg.CHUNK, Msg.MIRROR, Msg.FILE}
)
# What an executor may send. Everything but READY/HEARTBEAT is relayed to the client.
EXECUTOR_REPLIES = frozenset(
    {
        Msg.READY,
        Msg.HEARTBEAT,
        Msg.STREAM,
        Msg.DISPLAY,
        Msg.UPDATE_DISPLAY,
        Msg.CLEAR,
        Msg.RESULT,
        Msg.ERROR,
        Msg.DONE,
        Msg.VALUES,
        Msg.NEED,
        Msg.PONG,
        Msg.INPUT_REQUEST,
        Msg.CHUNK,
        Msg.MIRROR,
        Msg.REPLY,  # to the daemon's own requests (SNAPSHOT, RESTORE); never relayed
        Msg.FILE,  # a snapshot's files, ahead of its REPLY; never relayed
    }
)
# Replies that end a request: the client stops waiting after one of these.
FINAL_REPLIES = frozenset({Msg.DONE, Msg.VALUES, Msg.NEED, Msg.REPLY, Msg.FAIL, Msg.WELCOME, Msg.PONG})
# In an EXECUTE's "assumed" map: the name's value was made on the worker, not shipped.
WORKER_MADE = ""


class Err:
    """Error codes carried in FAIL replies, so clients can react without parsing text."""

    BAD_MESSAGE = "bad_message"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"
    TOO_LARGE = "too_large"
    VERSION = "version_mismatch"
    UNKNOWN_TYPE = "unknown_type"
    NO_SUCH_GPU = "no_such_gpu"
    BAD_SPEC = "bad_spec"
    UNAVAILABLE = "unavailable"
    NO_SESSION = "no_session"
    BUSY = "busy"
    WORKER_DIED = "worker_died"
    WORKER_START = "worker_start_failed"
    TIMEOUT = "timeout"
    RELEASED = "released"
    SHUTDOWN = "shutdown"
    VOLUME = "volume"
    WORKSPACE = "workspace"  # a sync or fetch refused: a bad relpath, the quota, a missing file
    PIP = "pip"  # a package install refused (a bad requirement) or failed (pip's exit status)
    RESTARTED = "daemon_restarted"  # the daemon that was serving a request is gone, and so is the request
    BUDGET = "budget"  # a cell refused before it started, or stopped, at a spending limit
    SNAPSHOT = "snapshot"  # a snapshot refused (none, busy, another user's) or failed


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_TCP_RE = re.compile(r"^tcp://(\[[^\]]+\]|[^:/\[\]]+):(\d+|\*)$")


def tcp_host(url: str) -> str:
    """The host of a ``tcp://HOST:PORT`` url ("" for anything else)."""
    m = _TCP_RE.match(url)
    return m.group(1) if m else ""


def on_this_host(url: str) -> bool:
    """An ipc socket or a loopback port: reachable from this machine alone."""
    return url.startswith("ipc://") or tcp_host(url) in LOOPBACK_HOSTS


class Env:
    """Environment variables through which a backend tells an executor who it is and where
    its daemon listens: the daemon-to-executor half of the protocol, before any message."""

    ENDPOINT = "JUPYTER_GPU_ENDPOINT"  # the ipc/tcp address the executor dials
    SESSION = "JUPYTER_GPU_SESSION"  # the worker id, also its ZeroMQ identity
    KEY = "JUPYTER_GPU_SESSION_KEY"  # the per-worker signing key (removed from the env once read)
    BULK_DIR = "JUPYTER_GPU_BULK_DIR"  # where large buffers are exchanged as files ("" = none)
    FLUSH_MS = "JUPYTER_GPU_FLUSH_MS"  # how long stream output is batched
    HEARTBEAT_S = "JUPYTER_GPU_HEARTBEAT_S"  # seconds between heartbeats
    ORPHAN_S = "JUPYTER_GPU_ORPHAN_S"  # how long to wait for a lost daemon before exiting
    # A worker that dials back over tcp (another node): the daemon's worker-socket public key,
    # and the worker's own CURVE secret key (one per session; removed from the env once read).
    CURVE_SERVER = "JUPYTER_GPU_CURVE_SERVER"
    CURVE_SECRET = "JUPYTER_GPU_CURVE_SECRET"
    TIME_WARNING = "JUPYTER_GPU_TIME_WARNING"  # seconds a batch system's SIGUSR1 comes before its time limit


class ProtocolError(Exception):
    """A message that cannot be accepted. ``msg_id`` is set when the header was readable,
    so the error reply can name the request it answers."""

    def __init__(self, code: str, text: str, msg_id: str | None = None, session: str = ""):
        super().__init__(text)
        self.code = code
        self.text = text
        self.msg_id = msg_id
        self.session = session


@dataclass(frozen=True)
class Limits:
    """Bounds checked on every received message before anything else is done with it."""

    max_header_bytes: int = 4 * 1024 * 1024
    max_frames: int = 4096
    max_message_bytes: int = 16 * 1024**3


ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,128}$")
# Session ids name directories, sockets and containers on the daemon's host: one plain
# path component that starts alphanumeric (never "." or ".."), or "" for requests that
# name no session.
SESSION_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_-]{0,127})?$")
MAX_HEADER_DEPTH = 32  # nesting of JSON arrays/objects in a header; real ones use 4


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (iterative: no recursion
    for a hostile header to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if depth > limit:
            return True
        stack.extend((item, depth + 1) for item in v if isinstance(item, (dict, list)))
    return False


@dataclass
class Message:
    type: str
    content: dict = field(default_factory=dict)
    session: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    parent: str = ""
    buffers: list = field(default_factory=list)
    wire_bytes: int = field(default=0, compare=False, repr=False)  # its frames' size, as it was received
    ahead: list = field(default_factory=list, compare=False, repr=False)  # CHUNKs that go before it (chunks.py)

    def reply(self, type: str, content: dict | None = None, buffers: Sequence = ()) -> "Message":
        """A message answering this one (same session, ``parent`` set to our id)."""
        return Message(type, content or {}, self.session, parent=self.id, buffers=list(buffers))


def new_key() -> bytes:
    return uuid.uuid4().hex.encode() + uuid.uuid4().hex.encode()


class Signer:
    """HMAC-SHA256 signing and checking of headers, with a replay guard."""

    def __init__(self, key: bytes, history: int = 65536):
        if not key:
            raise ValueError("a signing key is required")
        self._key = key
        self._seen: set[bytes] = set()
        self._order: deque[bytes] = deque()
        self._history = history

    def sign(self, header: bytes) -> bytes:
        return hmac.new(self._key, header, hashlib.sha256).hexdigest().encode()

    def check(self, header: bytes, signature: bytes, msg_id: str | None = None) -> None:
        if not hmac.compare_digest(self.sign(header), bytes(signature)):
            raise ProtocolError(Err.BAD_SIGNATURE, "message signature does not match: wrong key?", msg_id)
        if signature in self._seen:
            raise ProtocolError(Err.REPLAYED, "message was already received once (replay refused)", msg_id)
        self._seen.add(signature)
        self._order.append(signature)
        if len(self._order) > self._history:
            self._seen.discard(self._order.popleft())


def _frame_len(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    if hasattr(frame, "buffer"):  # zmq.Frame
        return len(frame.buffer)
    return memoryview(frame).nbytes


def wire_size(frames: list) -> int:
    """What packed or received frames take: the measure of a message kept for later."""
    return sum(_frame_len(f) for f in frames)


def pack(msg: Message, signer: Signer) -> list:
    """Frames for ``msg`` (without routing ids). Buffers are passed through untouched."""
    header = json.dumps(
        {
            "v": PROTOCOL_VERSION,
            "type": msg.type,
            "id": msg.id,
            "parent": msg.parent,
            "session": msg.session,
            "frames": [_frame_len(b) for b in msg.buffers],
            "content": msg.content,
        },
        separators=(",", ":"),
    ).encode()
    return [DELIM, signer.sign(header), header, *msg.buffers]


def split_routing(frames: list) -> tuple[list, list]:
    """Split ROUTER routing-id frames from the message proper."""
    for i, f in enumerate(frames):
        if _as_bytes_if_small(f) == DELIM:
            return frames[:i], frames[i + 1 :]
    raise ProtocolError(Err.BAD_MESSAGE, "no protocol delimiter frame: not a jupyter-gpu message")


def _as_bytes_if_small(frame: Any) -> bytes | None:
    if _frame_len(frame) != len(DELIM):
        return None
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def unpack(
    frames: list,
    signer: Signer,
    limits: Limits = Limits(),
    allowed: Iterable[str] | None = None,
) -> Message:
    """Check and decode frames that follow the delimiter. Raises ProtocolError.

    Only the header is decoded; buffers stay as the frames they arrived in.
    """
    if len(frames) < 2:
        raise ProtocolError(Err.BAD_MESSAGE, "message has no signature or header frame")
    if len(frames) - 2 > limits.max_frames:
        raise ProtocolError(Err.TOO_LARGE, f"message has {len(frames) - 2} buffers; at most {limits.max_frames}")
    sizes = [_frame_len(f) for f in frames]
    if sizes[1] > limits.max_header_bytes:
        raise ProtocolError(Err.TOO_LARGE, f"header is {sizes[1]} bytes; at most {limits.max_header_bytes}")
    sig = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    raw = frames[1].bytes if hasattr(frames[1], "bytes") else bytes(frames[1])
    try:
        h = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(Err.BAD_MESSAGE, "header is not valid UTF-8 JSON") from None
    except RecursionError:
        raise ProtocolError(Err.BAD_MESSAGE, f"header nests deeper than {MAX_HEADER_DEPTH} levels") from None
    # The id is read before the signature is checked only to say which request an error answers.
    msg_id = h.get("id") if isinstance(h, dict) and isinstance(h.get("id"), str) else None
    if msg_id is not None and not ID_RE.match(msg_id):
        msg_id = None
    total = sum(sizes)
    if total > limits.max_message_bytes:
        raise ProtocolError(
            Err.TOO_LARGE, f"message is {total} bytes; this daemon accepts at most {limits.max_message_bytes}", msg_id
        )
    signer.check(raw, sig, msg_id)
    if not isinstance(h, dict):
        raise ProtocolError(Err.BAD_MESSAGE, "header must be a JSON object")
    if _too_deep(h, MAX_HEADER_DEPTH):
        raise ProtocolError(Err.BAD_MESSAGE, f"header nests deeper than {MAX_HEADER_DEPTH} levels", msg_id)
    if h.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            Err.VERSION, f"protocol version {h.get('v')!r}; this side speaks {PROTOCOL_VERSION}", msg_id
        )
    for name, typ in (
        ("type", str),
        ("id", str),
        ("parent", str),
        ("session", str),
        ("frames", list),
        ("content", dict),
    ):
        if not isinstance(h.get(name), typ):
            raise ProtocolError(Err.BAD_MESSAGE, f"header field {name!r} must be a {typ.__name__}", msg_id)
    for name in ("id", "parent"):
        if not ID_RE.match(h[name]):
            raise ProtocolError(Err.BAD_MESSAGE, f"header field {name!r} has characters or length not allowed", msg_id)
    if not SESSION_RE.match(h["session"]):
        raise ProtocolError(
            Err.BAD_MESSAGE,
            f"session id {h['session'][:40]!r} is not allowed: use 1-128 letters, digits, '_' or '-', "
            "starting with a letter or digit",
            msg_id,
        )
    if h["frames"] != sizes[2:]:
        raise ProtocolError(Err.BAD_MESSAGE, "buffer frames do not match the sizes the header declares", msg_id)
    if allowed is not None and h["type"] not in allowed:
        raise ProtocolError(
            Err.UNKNOWN_TYPE, f"message type {h['type'][:40]!r} is not accepted here", msg_id, h["session"]
        )
    return Message(h["type"], h["content"], h["session"], h["id"], h["parent"], list(frames[2:]), total)
