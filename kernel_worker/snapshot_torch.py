"""Torch tensors in a snapshot: written from CPU memory as out-of-band buffers, put back on
a device of the same kind when the worker that restores them has one.

Plain pickling of a tensor goes through ``torch.save`` into the pickle stream (one more
copy of every byte, in-band) and records CUDA storage that a worker without a GPU cannot
even unpickle. Here a tensor is moved to the CPU, its bytes become a pickle-5 buffer
(the caller writes it straight to disk) and its device is recorded beside it.

Imported only when ``torch`` is already in ``sys.modules``: importing torch costs seconds.
"""

from __future__ import annotations

import math
import pickle
import threading
from typing import Any

from kernel_worker.snapshot import Pickler

_local = threading.local()


class TensorPickler(Pickler):
    """The snapshot's pickler, with tensors (parameters included, so ``nn.Module`` too)
    reduced to a CPU buffer plus their device. ``devices``: the devices they came from."""

    def __init__(self, file: Any, torch: Any, keep: Any) -> None:
        super().__init__(file, keep)
        self.torch = torch
        self.devices: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, self.torch.Tensor):
            reduced = _reduce_tensor(self.torch, obj)
            if reduced is not NotImplemented:
                self.met.append(obj)
                self.devices.add(reduced[1][-1])
                return reduced
        return super().reducer_override(obj)


def _reduce_tensor(torch: Any, t: Any) -> Any:
    """(rebuild, args) for a plain dense tensor or parameter; NotImplemented for anything
    else (sparse, quantized, subclasses), which then pickles the default way."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
        return NotImplemented
    if t.is_quantized or t.device.type == "meta":
        return NotImplemented
    try:
        import numpy  # noqa: F401  (Tensor.numpy needs it; without it the default path)
    except ImportError:
        return NotImplemented
    cpu = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    # A byte view of the CPU tensor's own memory: no copy for a contiguous CPU tensor.
    raw = cpu.reshape(-1).view(torch.uint8).numpy() if cpu.numel() else bytearray()
    dtype = str(t.dtype).removeprefix("torch.")
    is_param = type(t) is torch.nn.Parameter
    return _rebuild, (pickle.PickleBuffer(raw), dtype, tuple(t.shape), t.requires_grad, is_param, str(t.device))


def _target(torch: Any, device: str) -> tuple[str, str | None]:
    """Where a tensor that was on ``device`` goes in this worker, and a note when that is
    not where it was."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu", None
    if kind == "cuda" and torch.cuda.is_available():
        count, i = torch.cuda.device_count(), int(index or 0)
        if i < count:
            return f"cuda:{i}", None
        return "cuda:0", f"was on {device}; this worker has {count} GPU(s): put on cuda:0"
    if kind == "mps" and torch.backends.mps.is_available():
        return "mps", None
    return "cpu", f"was on {device}; this worker has no such device: left on the CPU (use .to('{kind}') on one)"


def _rebuild(buf: Any, dtype: str, shape: tuple, requires_grad: bool, is_param: bool, device: str) -> Any:
    import torch

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise pickle.UnpicklingError(f"unknown torch dtype {dtype!r}")
    if math.prod(shape) == 0:
        t = torch.empty(shape, dtype=dt)
    else:
        t = torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(shape)
    target, note = _target(torch, device)
    if note:
        getattr(_local, "notes", set()).add(note)
    if target != "cpu":
        t = t.to(target)
    if is_param:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(requires_grad) if requires_grad else t


def collect_notes(notes: set[str] | None) -> None:
    """Notes made by the rebuilds that follow on this thread go to ``notes`` (None: stop)."""
    _local.notes = notes if notes is not None else set()
