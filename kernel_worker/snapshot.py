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
import mmap
import os
import pickle
import re
import socket
import stat
import sys
import threading
import time
import types
from typing import Any

import cloudpickle

FORMAT = 1
MANIFEST = "manifest.json"
INBAND_MAX = 64 * 1024  # smaller buffers cost less inside the pickle stream than apart
_CHUNK = 1024 * 1024 * 1024  # per os.write/preadv call (Linux moves < 2 GiB a call); 64 MiB calls read 15% slower
_MANIFEST_MAX = 64 * 1024 * 1024
_FILE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")  # no "/", no leading "."
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_IPYTHON = {"In", "Out", "get_ipython", "exit", "quit"}
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO cannot hang us
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCKS = tuple({type(threading.Lock()), type(threading.RLock())})
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
_NOT_SHARED = (str, bytes, int, float, complex, tuple, frozenset, range, type, types.ModuleType, types.FunctionType)
_NOT_SHARED += (types.BuiltinFunctionType, types.MethodType, enum.Enum)
_BAGS = frozenset({dict, list, set, bytearray})
_GENERATORS = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


class SnapshotError(Exception):
    """A snapshot that cannot be used; the message says why and what to do."""


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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


def _versions() -> dict:
    mods = {m: getattr(sys.modules.get(m), "__version__", None) for m in ("numpy", "torch")}
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"format": FORMAT, "python": py, "cloudpickle": cloudpickle.__version__, **mods}


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


def _open(dfd: int, name: str, size: int | None = None) -> int:
    """A plain file of the snapshot, never through a symlink, of the size expected."""
    try:
        fd = os.open(name, _READ, dir_fd=dfd)
    except OSError as e:
        raise SnapshotError(f"{name} cannot be opened ({e.strerror}): the snapshot is damaged") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
        os.close(fd)
        what = "not a plain file" if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes, the manifest says {size}"
        raise SnapshotError(f"{name} is {what}: the snapshot is damaged")
    return fd


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done : done + _CHUNK]], offset + done)
        if n == 0:
            raise SnapshotError("a data file ended early: the snapshot is damaged")
        done += n


def _int(x: Any) -> bool:
    return type(x) is int and x >= 0


def _check_file(spec: Any) -> bool:
    """A plain name of a file in the snapshot (no "/", no ".."), and a size."""
    name = spec.get("file") if isinstance(spec, dict) else None
    return isinstance(name, str) and bool(_FILE_RE.match(name)) and _int(spec.get("size"))


def _check_entry(e: Any) -> bool:
    """The shape of one name's record, so that load can trust it (its files still not)."""
    if not isinstance(e, dict) or not _int(e.get("bytes")):
        return False
    if e.get("kind") == "module":
        return isinstance(e.get("module"), str) and bool(_MODULE_RE.match(e["module"]))
    if e.get("kind") not in ("value", "torch") or not _check_file(e.get("pickle")):
        return False
    bufs, data = e.get("buffers"), e.get("data")
    if not isinstance(bufs, list) or (data is None) != (not bufs) or (data is not None and not _check_file(data)):
        return False
    group = e.get("group", [])
    if not isinstance(group, list) or not all(isinstance(n, str) and n.isidentifier() for n in group):
        return False
    if "fingerprint" in e and not isinstance(e["fingerprint"], str):
        return False
    for b in bufs:
        ok = isinstance(b, dict) and _int(b.get("offset")) and _int(b.get("size"))
        if not ok or not isinstance(b.get("readonly"), bool) or b["offset"] + b["size"] > data["size"]:
            return False
    return True


def _major(version: str) -> str:
    return str(version).split(".")[0]


def read_manifest(directory: str) -> dict:
    """The manifest of the snapshot in ``directory``, checked: raises SnapshotError when it
    is missing, damaged, or made by a Python, cloudpickle or torch this worker cannot read."""
    try:
        dfd = os.open(directory, _DIR)
    except OSError as e:
        raise SnapshotError(f"snapshot {directory} cannot be opened: {e.strerror}") from None
    try:
        try:
            fd = _open(dfd, MANIFEST)
        except SnapshotError:
            raise SnapshotError(f"snapshot {directory} has no readable manifest: it is unfinished or damaged") from None
        try:
            text = os.read(fd, _MANIFEST_MAX + 1)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    try:
        m = json.loads(text) if len(text) <= _MANIFEST_MAX else None
    except ValueError:
        m = None
    need = {"format": int, "python": str, "cloudpickle": str, "created": (int, float), "names": dict, "left": dict}
    bad = not isinstance(m, dict) or any(not isinstance(m.get(k), t) for k, t in need.items())
    if bad or not all(isinstance(why, str) for why in m["left"].values()):
        raise SnapshotError(f"snapshot {directory} has a damaged manifest: it cannot be restored")
    if m["format"] != FORMAT:
        raise SnapshotError(f"snapshot format {m['format']} is unknown to this jupyter-gpu (it reads format {FORMAT})")
    here = _versions()
    if m["python"] != here["python"]:
        raise SnapshotError(
            f"the snapshot was made with Python {m['python']}, this worker runs Python {here['python']}: "
            f"pickled values do not move between Python versions; restore it on an image with Python {m['python']}"
        )
    if _major(m["cloudpickle"]) != _major(here["cloudpickle"]):
        raise SnapshotError(
            f"the snapshot was made with cloudpickle {m['cloudpickle']}, this worker has cloudpickle "
            f"{here['cloudpickle']}: restore it on an image with cloudpickle {_major(m['cloudpickle'])}.x"
        )
    for name, entry in m["names"].items():
        ok = isinstance(name, str) and name.isidentifier() and _check_entry(entry)
        if not ok or not set(entry.get("group", [])) <= m["names"].keys():
            raise SnapshotError(f"snapshot {directory} has a damaged manifest (entry {name!r}): it cannot be restored")
    if any(e["kind"] == "torch" for e in m["names"].values()):
        _check_torch(m.get("torch"))
    return m


def _check_torch(made_with: Any) -> None:
    """Torch's major version, read from its metadata: importing torch here costs seconds."""
    from importlib import metadata

    try:
        here = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return  # its tensors fail to load, each with why; the rest restore
    if not isinstance(made_with, str) or _major(made_with) != _major(here):
        raise SnapshotError(
            f"the snapshot was made with torch {made_with}, this worker has torch {here}: "
            f"restore it on an image with torch {_major(str(made_with))}.x"
        )


def _allocate(size: int) -> Any:
    """Writable memory for one buffer. Private anonymous memory with huge pages: no
    zero-filling pass first (bytearray(n) writes every page twice) and few page faults;
    measured reading 256 MiB from the page cache: 12 GB/s, bytearray 2 GB/s, plain
    mmap.mmap(-1, n) (shared memory, 4 KiB pages) 1.3 GB/s."""
    if size < mmap.PAGESIZE:
        return bytearray(size)
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= 2 * 1024 * 1024 and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # no transparent huge pages here: 4 KiB pages still work
    return mem


def _load_value(dfd: int, e: dict) -> Any:
    fd = _open(dfd, e["pickle"]["file"], e["pickle"]["size"])
    try:
        stream = os.pread(fd, e["pickle"]["size"], 0)
    finally:
        os.close(fd)
    if len(stream) != e["pickle"]["size"]:
        raise SnapshotError("a pickle file ended early: the snapshot is damaged")
    buffers: list[Any] = []
    if e["data"] is not None:
        fd = _open(dfd, e["data"]["file"], e["data"]["size"])
        try:
            for b in e["buffers"]:
                view = memoryview(_allocate(b["size"]))
                _read_into(fd, view, b["offset"])
                buffers.append(view.toreadonly() if b["readonly"] else view)
        finally:
            os.close(fd)
    return pickle.loads(stream, buffers=buffers)


def load(
    directory: str, manifest: dict, names: list[str], notes: dict[str, str] | None = None
) -> tuple[dict[str, object], dict[str, str]]:
    """The values of ``names`` from a snapshot whose ``manifest`` came from read_manifest,
    and the names that failed with why (the others still load). Reads only these names'
    files, so it is cheap to call again and again for one name at a time. ``notes``, when
    given, receives what the user should know about a loaded value (a tensor left on the
    CPU for want of a GPU). Names that hold the same objects (manifest entry "group") are
    pickled together and load together: the values returned then include the group's
    other names, not asked for."""
    import importlib

    values: dict[str, object] = {}
    failed: dict[str, str] = {}
    groups: dict[str, dict] = {}  # pickle file -> the values of a group loaded by this call
    dfd = os.open(directory, _DIR)
    try:
        for name in names:
            e = manifest["names"].get(name)
            if e is None:
                failed[name] = "not in this snapshot" + (
                    f": {manifest['left'][name]}" if name in manifest["left"] else ""
                )
                continue
            said: set[str] = set()
            try:
                if e["kind"] == "module":
                    values[name] = importlib.import_module(e["module"])
                    continue
                if e["kind"] == "torch":
                    from kernel_worker import snapshot_torch

                    snapshot_torch.collect_notes(said)
                if "group" not in e:
                    values[name] = _load_value(dfd, e)
                elif e["pickle"]["file"] not in groups:
                    group = _load_value(dfd, e)
                    if not isinstance(group, dict) or set(group) != set(e["group"]):
                        raise SnapshotError(f"the group of {name!r} does not hold what the manifest says")
                    groups[e["pickle"]["file"]] = group
                    for n, v in group.items():  # they come together, or they would not share
                        values.setdefault(n, v)
            except ModuleNotFoundError as err:
                failed[name] = (
                    f"needs the module {err.name!r}, which this worker does not have: install it, then run again"
                )
            except SnapshotError as err:
                failed[name] = str(err)
            except Exception as err:  # unpickling raises anything a value's code raises
                failed[name] = f"{_first_line(err)} while loading it: the snapshot of this value is unusable"
            finally:
                if e["kind"] == "torch":
                    snapshot_torch.collect_notes(None)
            if said and notes is not None:
                notes[name] = "; ".join(sorted(said))
    finally:
        os.close(dfd)
    return values, failed
