"""Namespace snapshots on disk: what a released worker leaves behind, and what the next
worker of the notebook restores (issue #13). Runs inside the worker process.

A snapshot is a private directory: per kept name one pickle stream (``N.pkl``, cloudpickle
protocol 5) and, when the value has large out-of-band buffers (numpy arrays, frames, torch
tensors), one data file (``N.bin``) into which each buffer's memory is written as it lies,
with no copy. ``manifest.json`` is written last and atomically: a directory without one is
an unfinished snapshot and is never read. Each name is read on its own (``load``), so the
caller can restore small values at once and large ones on first use.

Every input is hostile on read: file names must be plain names in the directory, sizes must
match, symlinks are never followed, and a bad value fails alone while the rest load.
Note that unpickling runs code: a snapshot must be readable by its own user only.
"""

from __future__ import annotations

import enum
import errno
import io
import json
import os
import pickle
import socket
import sys
import threading
import time
import types
from typing import Any

import cloudpickle

from kernel_worker.snapshot_read import (  # the format, shared with the reading side
    _CHUNK,
    _DIR,
    FORMAT,
    MANIFEST,
    SnapshotError,
    _first_line,
    _versions,
    load,
    read_manifest,
)

INBAND_MAX = 64 * 1024  # smaller buffers cost less inside the pickle stream than apart
_IPYTHON = {"In", "Out", "get_ipython", "exit", "quit"}
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCKS = tuple({type(threading.Lock()), type(threading.RLock())})
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
_NOT_SHARED = (str, bytes, int, float, complex, tuple, frozenset, range, type, types.ModuleType, types.FunctionType)
_NOT_SHARED += (types.BuiltinFunctionType, types.MethodType, enum.Enum)
_BAGS = frozenset({dict, list, set, bytearray})
_GENERATORS = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


def skipped(name: object) -> bool:
    """IPython's own names and private names (the new worker makes its own), and keys that
    are no Python name."""
    return not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name in _IPYTHON


def _why_not(value: Any) -> str | None:
    """Why a value is not worth trying to pickle (cloudpickle would even save an open text
    file's content, which is not what the user holds), or None."""
    if isinstance(value, io.IOBase) and not isinstance(value, (io.BytesIO, io.StringIO)):
        return "an open file cannot be saved: reopen it after the restore"
    if isinstance(value, socket.socket):
        return "a socket cannot be saved: connect again after the restore"
    if isinstance(value, _GENERATORS):
        return "a generator cannot be saved (where it stopped is lost): create it again after the restore"
    if isinstance(value, _LOCKS):
        return "a lock cannot be saved: create it again after the restore"
    if type(value).__name__ == "CUDAGraph":
        return "a CUDA graph cannot be saved: capture it again after the restore"
    return None


def _type_name(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}".removeprefix("builtins.")


def _write_all(fd: int, view: memoryview) -> None:
    """The whole buffer, straight from its memory (os.write may write less than asked)."""
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    for off in range(0, view.nbytes, _CHUNK):
        part = view[off : off + _CHUNK]
        while part.nbytes:
            part = part[os.write(fd, part) :]


class Pickler(cloudpickle.Pickler):
    """cloudpickle, noting the objects it meets that another name may hold too. Only what
    reaches reducer_override: not plain dicts, lists, str... (pickle skips the hook for
    those), which keeps this cheap; reading the pickler's memo instead costs 15x the dump."""

    def __init__(self, file: Any, keep: Any) -> None:
        super().__init__(file, protocol=5, buffer_callback=keep)
        self.met: list[Any] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not pickle.PickleBuffer:  # keeping it would keep a GPU tensor's CPU copy
            self.met.append(obj)
        return super().reducer_override(obj)

    def shared(self, value: Any) -> list[Any]:
        """What it met that two names can hold with meaning (a model's parameters and the
        optimizer that updates them), not what every value holds (a class's attributes,
        a dtype, a function)."""
        owned = {id(v) for c in self.met if isinstance(c, type) for k in c.__mro__ for v in vars(k).values()}
        found = [o for o in self.met if id(o) not in owned and _shareable(o)]
        return found + [value] if type(value) in _BAGS and value else found


def _pickler(out: Any, keep: Any) -> Pickler:
    torch = sys.modules.get("torch")
    if torch is None:  # then no value can hold a tensor, and torch is never imported
        return Pickler(out, keep)
    from kernel_worker.snapshot_torch import TensorPickler

    return TensorPickler(out, torch, keep)


def _shareable(obj: Any) -> bool:
    if isinstance(obj, _NOT_SHARED) or (callable(obj) and hasattr(obj, "__qualname__")):  # functions, by any name
        return False
    return hasattr(obj, "__dict__") or type(obj).__name__ in ("ndarray", "Tensor", "Parameter")


def _write_value(dfd: int, stem: str, value: Any, sync: bool) -> tuple[dict, list]:
    """One value's files, written as the pickler goes: each large out-of-band buffer
    straight from its memory into the data file when the pickler meets it (a model moved
    off the GPU tensor by tensor never needs all its CPU copies at once). Also returns the
    objects inside it that another name may hold too."""
    pkl, data = f"{stem}.pkl", f"{stem}.bin"
    buffers: list[dict] = []
    fds = {pkl: os.open(pkl, _CREATE, 0o600, dir_fd=dfd)}

    def keep(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < INBAND_MAX:
            return True
        if data not in fds:
            fds[data] = os.open(data, _CREATE, 0o600, dir_fd=dfd)
        offset = buffers[-1]["offset"] + buffers[-1]["size"] if buffers else 0
        buffers.append({"offset": offset, "size": raw.nbytes, "readonly": raw.readonly})
        _write_all(fds[data], raw)
        return False

    try:
        with open(fds[pkl], "wb", buffering=1024 * 1024, closefd=False) as out:
            p = _pickler(out, keep)
            p.dump(value)
            shared = p.shared(value)
        if sync:
            for fd in fds.values():
                os.fsync(fd)
        sizes = {name: os.fstat(fd).st_size for name, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)
    devices = getattr(p, "devices", set())
    entry: dict[str, Any] = {"kind": "torch" if devices else "value", "type": _type_name(value)}
    entry["pickle"] = {"file": pkl, "size": sizes[pkl]}
    entry["data"] = {"file": data, "size": sizes[data]} if buffers else None
    entry["buffers"] = buffers
    if devices:
        entry["devices"] = sorted(devices)
    entry["bytes"] = sum(sizes.values())
    return entry, shared


def _save(dfd: int, stem: str, value: Any, sync: bool) -> tuple[dict, list]:
    """_write_value, leaving no file behind when it fails; a full disk fails the snapshot."""
    try:
        return _write_value(dfd, stem, value, sync)
    except Exception as e:  # pickling raises anything: TypeError, PicklingError...
        for f in (f"{stem}.pkl", f"{stem}.bin"):
            try:
                os.unlink(f, dir_fd=dfd)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            raise SnapshotError(f"the snapshot could not be written ({e.strerror}): make room and take it again")
        raise


def _regroup(dfd: int, stem: str, members: list[str], items: dict, names: dict, sync: bool) -> None:
    """Names that hold the same objects are pickled together, so that they still do after
    the restore (an optimizer still updates the model's own parameters)."""
    for n in members:
        for f in (names[n]["pickle"]["file"], (names[n]["data"] or {}).get("file")):
            if f:
                os.unlink(f, dir_fd=dfd)
    entry, _ = _save(dfd, stem, {n: items[n] for n in members}, sync)
    for n in members:
        prints = {"fingerprint": names[n]["fingerprint"]} if "fingerprint" in names[n] else {}
        names[n] = {**entry, "type": _type_name(items[n]), "group": members, **prints}


def write(
    items: dict[str, object], directory: str, fingerprints: dict[str, str] | None = None, *, sync: bool = True
) -> dict:
    """Write the namespace ``items`` into ``directory`` (fresh, private, made by the caller)
    and return the manifest, also written last as ``manifest.json`` (rename: it is there
    whole or not at all). ``sync`` fsyncs each file before the manifest names it, and the
    manifest, so a host crash cannot leave a manifest naming unwritten data; without it a
    killed process still loses nothing (the page cache keeps it) and the write is faster.
    Never raises for a value (what cannot be kept is listed under "left", with why);
    raises SnapshotError when the disk is full (the caller removes the directory)."""
    start = time.perf_counter()
    items, fingerprints = dict(items), fingerprints or {}  # a namespace may change meanwhile
    names: dict[str, dict] = {}
    left: dict[str, str] = {}
    kept: list[Any] = []  # every object seen, alive until the end: its id stays its own
    owner: dict[int, str] = {}  # id of an object -> the first name that holds it
    link: dict[str, str] = {}  # names holding the same objects, as a union-find forest

    def root(n: str) -> str:
        while n in link:
            n = link[n]
        return n

    dfd = os.open(directory, _DIR)
    try:
        for index, (name, value) in enumerate(items.items()):
            if skipped(name):
                continue
            if isinstance(value, types.ModuleType) and sys.modules.get(value.__name__) is value:
                entry: dict[str, Any] = {"kind": "module", "module": value.__name__, "bytes": 0}
            elif why := _why_not(value):
                left[name] = why
                continue
            else:
                try:
                    entry, shared = _save(dfd, str(index), value, sync)
                except SnapshotError:
                    raise
                except Exception as e:
                    why = _first_line(e)
                    left[name] = f"{_type_name(value)} cannot be saved ({why}): create it again after the restore"
                    continue
                kept.append(shared)
                ids = {id(obj) for obj in shared}
                for other in {owner[i] for i in ids & owner.keys()}:
                    a, b = root(other), root(name)
                    if a != b:
                        link[b] = a
                owner.update(dict.fromkeys(ids - owner.keys(), name))
            if name in fingerprints:
                entry["fingerprint"] = str(fingerprints[name])
            names[name] = entry
        groups: dict[str, list[str]] = {}
        for n, e in names.items():
            if e["kind"] != "module":
                groups.setdefault(root(n), []).append(n)
        for k, members in enumerate(g for g in groups.values() if len(g) > 1):
            try:
                _regroup(dfd, f"g{k}", members, items, names, sync)
            except SnapshotError:
                raise
            except Exception as e:  # each pickled alone, but not together
                for n in members:
                    left[n] = f"{_type_name(items[n])} cannot be saved ({_first_line(e)}) with {', '.join(members)}"
                    del names[n]
        del kept
        manifest = {**_versions(), "created": time.time(), "names": names, "left": left}
        files = {e["pickle"]["file"]: e["bytes"] for e in names.values() if e["kind"] != "module"}
        manifest["bytes"] = sum(files.values())  # a group's files once
        manifest["seconds"] = round(time.perf_counter() - start, 6)
        text = json.dumps(manifest, indent=1).encode()
        tmp = MANIFEST + ".tmp"
        fd = os.open(tmp, _CREATE, 0o600, dir_fd=dfd)
        try:
            _write_all(fd, memoryview(text))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, MANIFEST, src_dir_fd=dfd, dst_dir_fd=dfd)
        if sync:
            os.fsync(dfd)  # the rename itself is durable
        return manifest
    finally:
        os.close(dfd)


__all__ = ["FORMAT", "MANIFEST", "SnapshotError", "load", "read_manifest", "skipped", "write"]
