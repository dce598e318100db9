"""Reading a snapshot (``snapshot.write`` makes them): the manifest checked as hostile
input (plain file names inside the directory, sizes, versions), then values one name at a
time, each from its own files, buffers read with ``preadv`` into fresh memory. Also the
format's constants and its error, which the writing side shares."""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import sys
from typing import Any

import cloudpickle

from kernel_worker.buffers import allocate

FORMAT = 1
MANIFEST = "manifest.json"
_CHUNK = 1024 * 1024 * 1024  # per os.write/preadv call (Linux moves < 2 GiB a call); 64 MiB calls read 15% slower
_MANIFEST_MAX = 64 * 1024 * 1024
_FILE_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")  # no "/", no leading "."
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO cannot hang us
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _versions() -> dict:
    mods = {m: getattr(sys.modules.get(m), "__version__", None) for m in ("numpy", "torch")}
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"format": FORMAT, "python": py, "cloudpickle": cloudpickle.__version__, **mods}


class SnapshotError(Exception):
    """A snapshot that cannot be used; the message says why and what to do."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


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
                view = memoryview(allocate(b["size"]))
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
