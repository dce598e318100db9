"""The snapshot format (kernel_worker/snapshot.py) with real values: what a notebook leaves
in a worker comes back equal, what cannot be kept is named with why, and a damaged,
hostile or foreign snapshot is refused or fails name by name, never read outside its
directory and never hanging."""

from __future__ import annotations

import io
import json
import os
import os.path
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kernel_worker import snapshot as S
from kernel_worker.snapshot import SnapshotError

BIG = 2**17  # float64 elements: 1 MiB, an out-of-band buffer in the data file


def _dir(tmp_path: Path, name: str = "snap") -> str:
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return str(d)


def _notebook_class() -> type:
    """A class as a notebook defines it: in __main__, so cloudpickle saves it by value."""

    def area(self) -> float:
        return self.w * self.h

    return type(
        "Rect", (), {"__module__": "__main__", "__init__": lambda s, w, h: s.__dict__.update(w=w, h=h), "area": area}
    )


def _namespace() -> dict:
    scale = 3

    def scaled(x: int) -> int:  # a closure over scale
        return x * scale

    Rect = _notebook_class()
    structured = np.zeros(5, dtype=[("id", "i4"), ("pos", "f8", (3,)), ("name", "U8")])
    structured["id"] = range(5)
    structured["name"] = ["a", "bb", "ccc", "d", "e"]
    frozen = np.arange(BIG, dtype=np.int64)
    frozen.flags.writeable = False
    return {
        "big": np.random.default_rng(1).random(BIG),
        "zero_d": np.array(3.5),
        "strided": np.arange(4 * BIG, dtype=np.float32)[::3],
        "fortran": np.asfortranarray(np.arange(BIG, dtype=np.int16).reshape(512, 256)),
        "structured": structured,
        "frozen": frozen,
        "frame": pd.DataFrame(
            {
                "i": np.arange(20_000),
                "f": np.linspace(0, 1, 20_000),
                "s": [f"row{i}" for i in range(20_000)],
                "t": pd.date_range("2026-01-01", periods=20_000, freq="min"),
                "c": pd.Categorical(["x", "y"] * 10_000),
                "b": np.arange(20_000) % 2 == 0,
            }
        ),
        "rect": Rect(2, 5),
        "scaled": scaled,
        "square": lambda x: x * x,
        "np": np,
        "osp": os.path,
        "small": {"lr": 3e-4, "tags": ["a", "b"]},
        "memfile": io.BytesIO(b"in memory, not a file"),
    }


def test_a_namespace_round_trips_equal(tmp_path: Path) -> None:
    ns = _namespace()
    d = _dir(tmp_path)
    written = S.write(ns, d, fingerprints={"big": "sha256:abc", "np": "mod"})
    m = S.read_manifest(d)
    assert m == json.loads(json.dumps(written))  # what write returned is what is on disk
    values, failed = S.load(d, m, list(ns))
    assert failed == {}
    for name in ("big", "zero_d", "strided", "fortran", "structured", "frozen"):
        assert values[name].dtype == ns[name].dtype and values[name].shape == ns[name].shape, name
        np.testing.assert_array_equal(values[name], ns[name])
    assert values["fortran"].flags.f_contiguous
    assert not values["frozen"].flags.writeable and values["big"].flags.writeable
    pd.testing.assert_frame_equal(values["frame"], ns["frame"])
    assert values["rect"].area() == 10 and type(values["rect"]).__name__ == "Rect"
    assert values["scaled"](2) == 6 and values["square"](4) == 16
    assert values["np"] is np and values["osp"] is os.path
    assert values["small"] == ns["small"]
    assert values["memfile"].getvalue() == b"in memory, not a file"
    assert m["names"]["np"] == {"kind": "module", "module": "numpy", "bytes": 0, "fingerprint": "mod"}
    assert m["names"]["big"]["fingerprint"] == "sha256:abc" and "fingerprint" not in m["names"]["rect"]
    assert m["names"]["big"]["data"]["size"] == BIG * 8  # written as it lay in memory, out of band


def test_the_manifest_says_what_is_where(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    m = S.write({"big": np.ones(BIG), "n": 1}, d)
    assert {"format", "python", "cloudpickle", "numpy", "torch", "created", "bytes", "seconds"} <= set(m)
    assert m["format"] == S.FORMAT and m["numpy"] == np.__version__
    assert m["names"]["big"]["kind"] == "value" and m["names"]["big"]["type"] == "numpy.ndarray"
    files = sorted(os.listdir(d))
    assert "manifest.json" in files and not any(f.endswith(".tmp") for f in files)
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for f in files if f != "manifest.json")
    assert m["bytes"] == on_disk == sum(e["bytes"] for e in m["names"].values())
    assert all(stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) == 0o600 for f in files)


def test_ipython_and_private_names_are_not_kept(tmp_path: Path) -> None:
    ns = {n: 1 for n in ("_", "__", "___", "_i", "_i3", "_ii", "_oh", "_dh", "In", "Out", "exit", "quit", "_x")}
    ns["get_ipython"] = lambda: None
    m = S.write({**ns, "kept": 2}, _dir(tmp_path))
    assert list(m["names"]) == ["kept"] and m["left"] == {}


def test_what_cannot_be_kept_is_named_with_why(tmp_path: Path) -> None:
    class Stubborn:
        def __reduce__(self):
            raise ValueError("no pickling me\nsecond line")

    f = open(__file__)
    sock = socket.socket()
    try:
        ns = {
            "f": f,
            "sock": sock,
            "gen": (i for i in range(3)),
            "lock": threading.Lock(),
            "rlock": threading.RLock(),
            "stubborn": Stubborn(),
            "holds_lock": {"lock": threading.Lock()},
            "ok": 1,
        }
        d = _dir(tmp_path)
        m = S.write(ns, d)
    finally:
        f.close()
        sock.close()
    left = m["left"]
    assert set(left) == set(ns) - {"ok"} and list(m["names"]) == ["ok"]
    assert left["f"] == "an open file cannot be saved: reopen it after the restore"
    assert left["sock"].startswith("a socket cannot be saved")
    assert left["gen"].startswith("a generator cannot be saved")
    assert left["lock"].startswith("a lock cannot be saved") and left["rlock"].startswith("a lock cannot be saved")
    assert "ValueError: no pickling me" in left["stubborn"] and "second line" not in left["stubborn"]
    assert "lock" in left["holds_lock"]
    assert sorted(os.listdir(d)) == ["7.pkl", "manifest.json"]  # nothing half-written left behind
    _, failed = S.load(d, S.read_manifest(d), ["f"])
    assert failed == {"f": f"not in this snapshot: {left['f']}"}


def test_names_load_one_at_a_time_reading_only_their_files(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    m = S.write({"huge": np.ones(4 * BIG), "small": 7}, d)
    os.unlink(os.path.join(d, m["names"]["huge"]["data"]["file"]))  # the big data never read
    m = S.read_manifest(d)
    assert S.load(d, m, ["small"]) == ({"small": 7}, {})
    assert S.load(d, m, ["small"]) == ({"small": 7}, {})  # again: nothing kept open or used up
    values, failed = S.load(d, m, ["huge", "small", "nosuch"])
    assert values == {"small": 7}
    assert "damaged" in failed["huge"] and failed["nosuch"] == "not in this snapshot"


def test_a_truncated_or_corrupt_value_fails_alone(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    m = S.write({"a": np.ones(BIG), "b": np.zeros(BIG), "c": [1, 2], "d": "fine"}, d)
    os.truncate(os.path.join(d, m["names"]["a"]["data"]["file"]), 100)
    with open(os.path.join(d, m["names"]["c"]["pickle"]["file"]), "r+b") as f:
        f.write(b"\xff\xff\xff")  # same size, garbage
    values, failed = S.load(d, S.read_manifest(d), ["a", "b", "c", "d"])
    assert set(values) == {"b", "d"} and set(failed) == {"a", "c"}
    assert "100 bytes, the manifest says" in failed["a"] and "damaged" in failed["a"]
    assert "unusable" in failed["c"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: "{not json",
        lambda m: json.dumps([1, 2]),
        lambda m: json.dumps({k: v for k, v in m.items() if k != "names"}),
        lambda m: json.dumps({**m, "names": {"a": {**m["names"]["a"], "pickle": {"file": "../x", "size": 3}}}}),
        lambda m: json.dumps({**m, "names": {"a": {**m["names"]["a"], "pickle": {"file": "sub/x", "size": 3}}}}),
        lambda m: json.dumps({**m, "names": {"a": {**m["names"]["a"], "pickle": {"file": "..", "size": 3}}}}),
        lambda m: json.dumps({**m, "names": {"a": {**m["names"]["a"], "pickle": {"file": "x", "size": -1}}}}),
        lambda m: json.dumps(
            {**m, "names": {"a": {**m["names"]["a"], "buffers": [{"offset": 2**40, "size": 8, "readonly": False}]}}}
        ),
        lambda m: json.dumps({**m, "names": {"../a": m["names"]["a"]}}),
        lambda m: json.dumps({**m, "names": {"a": {**m["names"]["a"], "kind": "exec"}}}),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-names",
        "dotdot",
        "slash",
        "dotdot-alone",
        "negative",
        "offset",
        "badname",
        "kind",
    ],
)
def test_a_damaged_or_hostile_manifest_is_refused(tmp_path: Path, damage) -> None:
    d = _dir(tmp_path)
    m = S.write({"a": np.ones(BIG)}, d)
    (Path(d) / "manifest.json").write_text(damage(m))
    with pytest.raises(SnapshotError, match="damaged manifest|cannot be restored"):
        S.read_manifest(d)


def test_an_unfinished_snapshot_is_refused(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    S.write({"a": 1}, d)
    os.unlink(os.path.join(d, "manifest.json"))
    with pytest.raises(SnapshotError, match="no readable manifest: it is unfinished or damaged"):
        S.read_manifest(d)


def test_symlinks_and_fifos_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    d = _dir(tmp_path)
    m = S.write({"a": np.ones(BIG), "b": 1, "c": 2}, d)
    data = Path(d) / m["names"]["a"]["data"]["file"]
    outside.write_bytes(data.read_bytes())  # same size: only the symlink check stands in the way
    data.unlink()
    data.symlink_to(outside)
    fifo = Path(d) / m["names"]["b"]["pickle"]["file"]
    fifo.unlink()
    os.mkfifo(fifo)  # opening a FIFO to read would block forever
    values, failed = S.load(d, S.read_manifest(d), ["a", "b", "c"])
    assert values == {"c": 2}
    assert "cannot be opened" in failed["a"] and "not a plain file" in failed["b"]
    # and the manifest itself through a symlink
    d2 = _dir(tmp_path, "other")
    os.symlink(os.path.join(d, "manifest.json"), os.path.join(d2, "manifest.json"))
    with pytest.raises(SnapshotError, match="no readable manifest"):
        S.read_manifest(d2)


def _edit(d: str, **changes) -> None:
    p = Path(d) / "manifest.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def test_another_python_or_cloudpickle_or_format_is_refused_naming_both(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    m = S.write({"a": 1}, d)
    _edit(d, python="3.9")
    with pytest.raises(SnapshotError) as e:
        S.read_manifest(d)
    assert "Python 3.9" in str(e.value) and f"Python {m['python']}" in str(e.value)
    _edit(d, python=m["python"], cloudpickle="1.6.0")
    with pytest.raises(SnapshotError) as e:
        S.read_manifest(d)
    assert "cloudpickle 1.6.0" in str(e.value) and f"cloudpickle {m['cloudpickle']}" in str(e.value)
    major = m["cloudpickle"].split(".")[0]
    _edit(d, cloudpickle=f"{major}.999.0")  # a minor difference is fine
    assert S.read_manifest(d)["cloudpickle"] == f"{major}.999.0"
    _edit(d, format=99)
    with pytest.raises(SnapshotError, match="format 99 is unknown"):
        S.read_manifest(d)


def test_another_torch_major_is_refused_when_the_snapshot_holds_tensors(tmp_path: Path, monkeypatch) -> None:
    from importlib import metadata

    d = _dir(tmp_path)
    m = S.write({"a": 1}, d)
    entry = {**m["names"]["a"], "kind": "torch", "devices": ["cuda:0"]}
    _edit(d, torch="1.13.1", names={"a": entry})
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda p: "2.5.1" if p == "torch" else real(p))
    with pytest.raises(SnapshotError) as e:
        S.read_manifest(d)
    assert "torch 1.13.1" in str(e.value) and "torch 2.5.1" in str(e.value)
    _edit(d, torch="2.1.0")
    assert S.read_manifest(d)["torch"] == "2.1.0"


def test_a_full_disk_fails_the_whole_snapshot_with_what_to_do(tmp_path: Path) -> None:
    import resource
    import signal

    d = _dir(tmp_path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
    try:
        with pytest.raises(SnapshotError, match="could not be written .* take it again"):
            S.write({"small": 1, "big": np.ones(4 * BIG)}, d)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old)
    assert "manifest.json" not in os.listdir(d)


def test_torch_is_never_imported_for_a_namespace_without_it(tmp_path: Path) -> None:
    """Importing torch costs seconds: a snapshot of numpy values neither writes nor reads it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\nfrom kernel_worker import snapshot as S\n"
        f"d = {_dir(tmp_path)!r}\nS.write({{'a': np.ones(2**17), 'np': np}}, d)\n"
        "v, f = S.load(d, S.read_manifest(d), ['a', 'np'])\nassert not f and v['a'].sum() == 2**17\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)


def test_names_that_hold_the_same_objects_still_do_after_the_restore(tmp_path: Path) -> None:
    a = np.arange(BIG, dtype=np.float64)
    cache = {"rows": [a], "n": 1}
    ns = {"a": a, "holder": {"a": a}, "cache": cache, "same": cache, "alone": np.ones(BIG), "other": np.zeros(BIG)}
    d = _dir(tmp_path)
    m = S.write(ns, d, fingerprints={"a": "fp-a"})
    assert m["names"]["a"]["group"] == ["a", "holder", "cache", "same"] and m["names"]["a"]["fingerprint"] == "fp-a"
    assert "group" not in m["names"]["alone"] and "group" not in m["names"]["other"]  # a dtype is not a link
    assert m["bytes"] == sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f != "manifest.json")
    m = S.read_manifest(d)
    values, failed = S.load(d, m, ["holder"])  # one of them brings the others
    assert failed == {} and set(values) == {"a", "holder", "cache", "same"}
    assert values["holder"]["a"] is values["a"] and values["cache"]["rows"][0] is values["a"]
    assert values["same"] is values["cache"]
    np.testing.assert_array_equal(values["a"], a)
    assert S.load(d, m, ["alone"])[0].keys() == {"alone"}
