"""Values to frames and back: cloudpickle with pickle protocol 5 out-of-band buffers.

Used by the notebook client and the executor, never by the daemon (which does not
unpickle). Needs only cloudpickle and the standard library.

Each value becomes one pickle payload frame followed by its out-of-band buffers
(numpy arrays, bytes-likes, torch CPU tensors...), so large data is never copied
into the pickle stream.
"""

from __future__ import annotations

import pickle
from typing import Any, Iterable

import cloudpickle

from kernel_worker import bulk

# Buffers smaller than this are cheaper in-band than as their own frame.
INBAND_MAX = 64 * 1024


class SerializationError(Exception):
    """A value that cannot travel. ``name`` is the variable it was bound to."""

    def __init__(self, name: str, value: Any, reason: BaseException):
        tname = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
        super().__init__(
            f"variable {name!r} ({tname}) cannot be sent to the worker: {reason}. "
            f"Create it inside the %%gpu cell instead, or delete it locally (del {name}) "
            "if the cell does not need it."
        )
        self.name = name
        self.type_name = tname


def dumps(value: Any) -> list:
    """One payload frame plus its out-of-band buffers (as raw memoryviews)."""
    buffers: list = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < INBAND_MAX:
            return True
        buffers.append(raw)
        return False

    return [cloudpickle.dumps(value, protocol=5, buffer_callback=keep), *buffers]


def loads(frames: list) -> Any:
    return pickle.loads(frames[0], buffers=frames[1:])


def dump_values(values: dict[str, Any]) -> tuple[list[dict], list]:
    """Serialise a namespace slice; ``specs`` say which frames belong to which name."""
    specs, frames = [], []
    for name, value in values.items():
        try:
            parts = dumps(value)
        except Exception as e:  # pickling raises all sorts: TypeError, PicklingError, AttributeError...
            raise SerializationError(name, value, e) from None
        specs.append({"name": name, "nframes": len(parts)})
        frames.extend(parts)
    return specs, frames


def load_values(specs: Iterable[dict], frames: list) -> dict[str, Any]:
    out, i = {}, 0
    for spec in specs:
        n = int(spec["nframes"])
        out[spec["name"]] = loads(frames[i : i + n])
        i += n
    return out


def receive_values(content: dict, frames: list, bulk_dir: str) -> dict[str, Any]:
    """The values a message carries: bulk buffers mapped back in from ``bulk_dir``, frames
    copied out of ZeroMQ's read-only memory so values are writable like local ones."""
    moved = content.get("bulk") or {}
    if moved:
        frames = bulk.restore(frames, moved, bulk_dir)
    frames = [f if isinstance(f, memoryview) else bytearray(f.buffer) for f in frames]
    return load_values(content.get("values", []), frames)
