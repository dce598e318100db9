"""The workspace sync engine on real files: the notebook's side (jupyter_gpu.workdir: ignore
rules, stat cache, limits) and the daemon's (kernel_worker.workspace: per-user trees,
hostile relpaths, quota, what a cell changed, fetch)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from jupyter_gpu import workdir
from jupyter_gpu.workdir import Manifest, Rules, WorkdirSync, notebook_key
from kernel_worker.workspace import (
    BadPath,
    Local,
    QuotaExceeded,
    WorkspaceError,
    Workspaces,
    check_relpath,
    glob_regex,
)

KEY = "0123456789abcdef" * 2


def put(root, rel: str, data: bytes | str = b"x", age: float = 10.0) -> str:
    """Write ``root/rel``, its mtime ``age`` seconds in the past (older than RACY_NS, so
    its hash may be cached)."""
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    past = time.time() - age
    os.utime(path, (past, past))
    return path


def sha(data: bytes) -> str:
    return workdir.content_hash(data)


def synced(tmp_path, files: dict[str, bytes | str], **traits) -> list[str]:
    src = tmp_path / "nb"
    src.mkdir(exist_ok=True)
    for rel, data in files.items():
        put(src, rel, data)
    return sorted(WorkdirSync(**traits).scan(str(src)).entries)


def sync(w: WorkdirSync, ws: Workspaces, src, user: str = "alice", key: str = KEY) -> tuple[Manifest, dict]:
    m = w.scan(str(src))
    send = w.plan(m, ws.have(user, key))
    return m, ws.apply(user, key, m.entries, w.contents(m, send))


@pytest.fixture
def ws(tmp_path) -> Workspaces:
    return Workspaces(root=str(tmp_path / "workspaces"))


# ----------------------------------------------------------------------------- ignore rules


def test_glob_regex():
    def full(pat, path):
        return re.fullmatch(glob_regex(pat), path) is not None

    assert full("*.py", "a.py") and not full("*.py", "d/a.py")
    assert full("a?c", "abc") and not full("a?c", "a/c")
    assert full("[ab]x", "bx") and not full("[!ab]x", "bx") and full("[!ab]x", "cx") and not full("[!a]", "/")
    assert full("**/x", "x") and full("**/x", "a/b/x")
    assert full("a/**/b", "a/b") and full("a/**/b", "a/x/y/b") and not full("a/**/b", "ab")
    assert full("out/**", "out/a/b") and not full("out/**", "out")
    assert full("\\*", "*") and not full("\\*", "a")
    assert full("[a-c]", "b") and not full("[a-c]", "-")
    assert full("x[", "x[")


def test_defaults_exclude_tool_directories(tmp_path):
    got = synced(
        tmp_path,
        {
            "a.py": "1",
            ".git/HEAD": "ref",
            "__pycache__/a.cpython-311.pyc": "c",
            "sub/b.pyc": "c",
            ".ipynb_checkpoints/n-checkpoint.ipynb": "{}",
            "node_modules/x/index.js": "",
            ".venv/bin/python": "",
            "sub/keep.txt": "k",
        },
    )
    assert got == ["a.py", "sub/keep.txt"]


def test_gitignore_negation_anchoring_and_directories(tmp_path):
    gitignore = "\n".join(
        [
            "# a comment",
            "",
            "*.log",
            "!keep.log",
            "/build",  # only at the top
            "docs/*.md",  # a middle slash anchors too
            "**/cache",
            "data/",  # directories only
            "\\#literal",
            "out/**",
            "!out/wanted.txt",
            "tmp[0-9]",
        ]
    )
    got = synced(
        tmp_path,
        {
            ".gitignore": gitignore,
            "x.log": "",
            "sub/y.log": "",
            "keep.log": "",
            "sub/keep.log": "",
            "build/o.bin": "",
            "sub/build/o.bin": "",
            "docs/a.md": "",
            "docs/deep/b.md": "",
            "sub/docs/c.md": "",
            "cache/z": "",
            "a/b/cache/z": "",
            "data/d.csv": "",
            "sub/data": "a file named data",
            "#literal": "",
            "out/drop.txt": "",
            "out/wanted.txt": "",
            "tmp1": "",
            "tmpx": "",
        },
    )
    assert got == [
        ".gitignore",
        "docs/deep/b.md",
        "keep.log",
        "out/wanted.txt",
        "sub/build/o.bin",
        "sub/data",
        "sub/docs/c.md",
        "sub/keep.log",
        "tmpx",
    ]


def test_nested_ignore_files_and_precedence(tmp_path):
    got = synced(
        tmp_path,
        {
            ".gitignore": "*.csv\nsecret/\n",
            ".jupyter-gpu-ignore": "!wanted.csv\n*.bin\n",  # read after .gitignore: may re-include
            "wanted.csv": "",
            "other.csv": "",
            "sub/.gitignore": "/local.txt\n!other.csv\n",  # relative to sub/, and deeper wins
            "sub/local.txt": "",
            "sub/other.csv": "",
            "sub/deeper/local.txt": "",
            "m.bin": "",
            "secret/.gitignore": "!*\n",  # inside an excluded directory: never read, nothing re-included
            "secret/key": "",
            "sub/x.pyc": "",
        },
    )
    assert got == [
        ".gitignore",
        ".jupyter-gpu-ignore",
        "sub/.gitignore",
        "sub/deeper/local.txt",
        "sub/other.csv",
        "wanted.csv",
    ]


def test_ignore_file_may_reinclude_a_default_and_excludes_are_configurable(tmp_path):
    assert synced(tmp_path, {".jupyter-gpu-ignore": "!*.pyc\n", "m.pyc": ""}) == [".jupyter-gpu-ignore", "m.pyc"]
    assert synced(tmp_path, {"m.pyc": "", "big.h5": ""}, excludes=["*.h5"]) == [".jupyter-gpu-ignore", "m.pyc"]


def test_rules_match_says_nothing_when_no_pattern_applies():
    rules = Rules(["*.tmp", "!a.tmp", "logs/"], base="sub")
    assert rules.match("sub/x.tmp", "x.tmp", False) is True
    assert rules.match("sub/a.tmp", "a.tmp", False) is False
    assert rules.match("sub/logs", "logs", True) is True
    assert rules.match("sub/logs", "logs", False) is None
    assert rules.match("sub/x.py", "x.py", False) is None


# ----------------------------------------------------------------------------- scan


def test_scan_entries_links_and_special_files(tmp_path):
    src = tmp_path / "nb"
    put(src, "a.txt", b"hello")
    put(src, "run.sh", b"#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o755)
    outside = tmp_path / "outside"
    put(outside, "secret.txt", b"s")
    os.symlink(outside, src / "linkdir")
    os.symlink("a.txt", src / "inside-link")
    os.mkfifo(src / "pipe")
    m = WorkdirSync().scan(str(src))
    assert m.entries == {"a.txt": (5, sha(b"hello"), 0o644 & ~_umask()), "run.sh": (10, sha(b"#!/bin/sh\n"), 0o755)}
    why = dict(m.left_out)
    assert set(why) == {"linkdir", "inside-link", "pipe"}
    assert "symbolic link" in why["linkdir"] and "not a regular file" in why["pipe"]
    assert m.total_bytes == 15


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_scan_leaves_out_names_the_workspace_would_refuse(tmp_path):
    src = tmp_path / "nb"
    put(src, "ok.txt")
    put(src, "new\nline.txt")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(os.fsencode(src), b"bad-\xff.txt"), "wb") as f:
        f.write(b"x")
    m = WorkdirSync().scan(str(src))
    assert list(m.entries) == ["ok.txt"]
    why = dict(m.left_out)
    assert "control character" in why["new\nline.txt"]
    assert any("UTF-8" in w for w in why.values())


def test_scan_leaves_out_a_file_it_cannot_open(tmp_path, monkeypatch):
    """A file that cannot be opened (as a user would find one they may not read; root reads
    everything, so the open is made to fail) is left out, named, and the rest syncs."""
    src = tmp_path / "nb"
    put(src, "locked")
    put(src, "fine")
    real = workdir._hash_file

    def refuse(path, keep):
        if path.endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path, keep)

    monkeypatch.setattr(workdir, "_hash_file", refuse)
    m = WorkdirSync().scan(str(src))
    assert list(m.entries) == ["fine"] and dict(m.left_out) == {"locked": "cannot be read: Permission denied"}


def test_scan_refuses_a_root_it_cannot_open(tmp_path):
    """An empty manifest would empty the workspace: a missing directory is an error instead."""
    with pytest.raises(FileNotFoundError):
        WorkdirSync().scan(str(tmp_path / "gone"))
    os.symlink(tmp_path, tmp_path / "link")
    with pytest.raises(OSError):
        WorkdirSync().scan(str(tmp_path / "link"))


def test_a_file_changed_while_hashed_is_read_and_hashed_again(tmp_path, monkeypatch):
    src = tmp_path / "nb"
    path = put(src, "busy.txt", "before")
    real = workdir._hash_file

    def racing(p, keep):
        sha_, data, before, after = real(p, keep)
        put(src, "busy.txt", "after!!")  # a write lands while the scan reads
        return sha_, data, before, workdir._skey(os.stat(p))

    monkeypatch.setattr(workdir, "_hash_file", racing)
    w = WorkdirSync()
    m = w.scan(str(src))
    monkeypatch.setattr(workdir, "_hash_file", real)
    assert m.kept == {}
    files = w.contents(m, ["busy.txt"])
    assert bytes(files["busy.txt"]) == b"after!!" and m.entries["busy.txt"][:2] == (7, sha(b"after!!"))
    assert w.scan(str(src)).hashed == 1  # and it never reached the cache
    os.remove(path)
    os.mkfifo(path)  # a FIFO in its place: not read (it would block), dropped
    m2 = Manifest(str(src), entries={"busy.txt": (7, sha(b"after!!"), 0o644)}, stats={"busy.txt": ()})
    assert w.contents(m2, ["busy.txt"]) == {} and "busy.txt" in dict(m2.left_out)


def test_limits_leave_files_out_with_a_readable_message(tmp_path):
    src = tmp_path / "nb"
    put(src, "huge.bin", b"x" * 5000)
    for i in range(6):
        put(src, f"f{i}.txt", b"y" * 100)
    w = WorkdirSync(max_file_bytes=1000, max_files=4, max_total_bytes=250)
    m = w.scan(str(src))
    assert list(m.entries) == ["f0.txt", "f1.txt"]  # the third would pass 250 bytes
    why = dict(m.left_out)
    assert "over WorkdirSync.max_file_bytes = 1.0 kB" in why["huge.bin"]
    assert "WorkdirSync.max_total_bytes" in why["f2.txt"]
    msg = w.message(m.left_out, most=3)
    assert "\n" not in msg and msg.startswith("jupyter-gpu: 5 files")
    assert "f2.txt, f3.txt, f4.txt and 1 more (would pass WorkdirSync.max_total_bytes = 250 B)" in msg
    assert "huge.bin (5.0 kB, over" in msg and msg.endswith(
        "raise the limit named in your Jupyter config (c.WorkdirSync)."
    )
    assert "f2.txt and 3 more (would pass" in (one := w.message(m.left_out, most=1))
    assert "250 B); 1 more for other reasons. To sync them" in one
    assert w.message([("link", "a symbolic link")]).endswith("exclude them in .jupyter-gpu-ignore to silence this.")
    assert w.message([]) == ""
    m = WorkdirSync(max_files=2).scan(str(src))
    assert "past WorkdirSync.max_files = 2" in dict(m.left_out)["f2.txt"] and "f1.txt" in m.entries
    for name in ("max_total_bytes", "max_files", "max_file_bytes", "excludes"):
        assert WorkdirSync.class_traits()[name].help


def test_stat_cache_avoids_hashing(tmp_path, monkeypatch):
    calls: list[str] = []
    real = workdir._hash_file

    def counting(path, keep):
        calls.append(os.path.basename(path))
        return real(path, keep)

    monkeypatch.setattr(workdir, "_hash_file", counting)
    src = tmp_path / "nb"
    for i in range(50):
        put(src, f"d{i % 5}/f{i}.txt", f"content {i}")
    w = WorkdirSync()
    first = w.scan(str(src))
    assert len(calls) == first.hashed == 50
    calls.clear()
    again = w.scan(str(src))
    assert calls == [] and again.hashed == 0 and again.entries == first.entries

    put(src, "d0/f0.txt", "changed")  # new content, mtime in the past: stat differs
    assert w.scan(str(src)).entries["d0/f0.txt"][1] == sha(b"changed") and calls == ["f0.txt"]
    calls.clear()

    path = put(src, "d1/f1.txt", "content X")  # same size; mtime put back as `cp -p` would
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, first_mtime := st.st_mtime_ns))
    m = w.scan(str(src))
    assert calls == ["f1.txt"] and m.entries["d1/f1.txt"][1] == sha(b"content X")  # ctime gave it away
    assert os.stat(path).st_mtime_ns == first_mtime
    calls.clear()

    put(src, "fresh.txt", "now", age=0)  # written just now: hashed, but not trusted to the cache yet
    w.scan(str(src))
    w.scan(str(src))
    assert calls == ["fresh.txt", "fresh.txt"]
    calls.clear()

    os.remove(src / "d2" / "f2.txt")
    m = w.scan(str(src))
    assert "d2/f2.txt" not in m.entries and calls == ["fresh.txt"]


def test_contents_rehashes_a_file_changed_after_the_scan(tmp_path):
    src = tmp_path / "nb"
    put(src, "a.txt", "first")
    put(src, "b.txt", "stays")
    put(src, "c.txt", "goes")
    w = WorkdirSync()
    m = w.scan(str(src))
    assert set(m.kept) == {"a.txt", "b.txt", "c.txt"}
    put(src, "a.txt", "second, longer")
    os.remove(src / "c.txt")
    files = w.contents(m, ["a.txt", "b.txt", "c.txt"])
    assert bytes(files["a.txt"]) == b"second, longer" and bytes(files["b.txt"]) == b"stays"
    assert m.entries["a.txt"][:2] == (14, sha(b"second, longer"))
    assert "c.txt" not in m.entries and "c.txt" in dict(m.left_out)


def test_plan_names_what_the_workspace_lacks(tmp_path):
    src = tmp_path / "nb"
    put(src, "same", "s")
    put(src, "differs", "d")
    put(src, "new", "n")
    w = WorkdirSync()
    m = w.scan(str(src))
    assert w.plan(m, {"same": sha(b"s"), "differs": sha(b"old"), "gone": sha(b"g")}) == ["differs", "new"]


def test_notebook_key_is_a_valid_workspace_key(tmp_path, ws):
    key = notebook_key(str(tmp_path / "a.ipynb"))
    assert key != notebook_key(str(tmp_path / "b.ipynb")) and key == notebook_key(str(tmp_path / "a.ipynb"))
    assert os.path.isdir(ws.path("alice", key))


# ----------------------------------------------------------------------------- workspaces


def test_sync_round_trip_unchanged_and_deletions(tmp_path, ws):
    src = tmp_path / "nb"
    put(src, "a.txt", "a")
    put(src, "sub/b.txt", "b")
    put(src, "sub/deep/c.txt", "c")
    put(src, "tool", "#!/bin/sh")
    os.chmod(src / "tool", 0o755)
    w = WorkdirSync()
    _, done = sync(w, ws, src)
    tree = ws.path("alice", KEY)
    assert done["written"] == ["a.txt", "sub/b.txt", "sub/deep/c.txt", "tool"]
    assert open(os.path.join(tree, "sub/deep/c.txt")).read() == "c"
    assert stat.S_IMODE(os.stat(os.path.join(tree, "tool")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(tree, "a.txt")).st_mode) == 0o600
    for d in (ws.root, os.path.dirname(os.path.dirname(tree)), os.path.dirname(tree), tree):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert ws.have("alice", KEY) == {r: e[1] for r, e in w.scan(str(src)).entries.items()}

    m, done = sync(w, ws, src)  # nothing changed: nothing travels
    assert done == {"written": [], "deleted": [], "kept": []} and m.hashed == 0

    put(tree, "result.csv", "cell output")  # a cell's file: no manifest lists it
    os.chmod(src / "tool", 0o644)
    os.remove(src / "sub" / "deep" / "c.txt")
    put(src, "a.txt", "a2")
    _, done = sync(w, ws, src)
    assert done == {"written": ["a.txt"], "deleted": ["sub/deep/c.txt"], "kept": []}
    assert not os.path.exists(os.path.join(tree, "sub/deep"))  # emptied by the sync: removed too
    assert open(os.path.join(tree, "result.csv")).read() == "cell output"
    assert stat.S_IMODE(os.stat(os.path.join(tree, "tool")).st_mode) == 0o600
    assert not [n for n in os.listdir(tree) if n.startswith(".jgpu-tmp-")]


def test_a_manifest_that_travelled_as_json_and_large_files_in_threads(tmp_path, ws):
    """The wire will carry the manifest as JSON (lists, not tuples); more than 8 MB to hash
    or write goes through the thread pools on both sides."""
    src = tmp_path / "nb"
    blobs = {f"big/{i}.bin": os.urandom(3 * 1024 * 1024 + i) for i in range(4)}
    for rel, data in blobs.items():
        put(src, rel, data)
    w = WorkdirSync()
    m = w.scan(str(src))
    assert m.hashed == 4 and set(m.kept) == set(blobs)
    wire = json.loads(json.dumps(m.entries))
    send = w.plan(m, ws.have("alice", KEY))
    done = ws.apply("alice", KEY, wire, w.contents(m, send))
    assert done["written"] == sorted(blobs)
    tree = ws.path("alice", KEY)
    assert all(open(os.path.join(tree, rel), "rb").read() == data for rel, data in blobs.items())
    m = w.scan(str(src))
    assert w.plan(m, ws.have("alice", KEY)) == []
    assert ws.apply("alice", KEY, json.loads(json.dumps(m.entries)), {}) == {"written": [], "deleted": [], "kept": []}


def test_cell_changed_files_are_resent_and_never_deleted(tmp_path, ws):
    src = tmp_path / "nb"
    put(src, "model.py", "v1")
    put(src, "notes.txt", "n")
    w = WorkdirSync()
    sync(w, ws, src)
    tree = ws.path("alice", KEY)
    put(tree, "model.py", "edited by a cell")
    put(tree, "notes.txt", "also edited", age=5)
    assert set(ws.have("alice", KEY)) == set()  # neither is as the sync left it
    os.remove(src / "notes.txt")
    m, done = sync(w, ws, src)
    assert done == {"written": ["model.py"], "deleted": [], "kept": ["notes.txt"]}  # the notebook's copy wins
    assert open(os.path.join(tree, "model.py")).read() == "v1"
    assert open(os.path.join(tree, "notes.txt")).read() == "also edited"
    _, done = sync(w, ws, src)
    assert done == {"written": [], "deleted": [], "kept": []}  # kept files are the user's now


def test_state_survives_a_daemon_restart_and_a_corrupt_state_deletes_nothing(tmp_path, ws):
    src = tmp_path / "nb"
    put(src, "a.txt", "a")
    put(src, "b.txt", "b")
    w = WorkdirSync()
    sync(w, ws, src)
    again = Workspaces(root=ws.root)
    assert again.have("alice", KEY) == ws.have("alice", KEY) != {}
    state = os.path.join(os.path.dirname(ws.path("alice", KEY)), "state.json")
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    with open(state, "w") as f:
        f.write("{not json")
    fresh = Workspaces(root=ws.root)
    assert fresh.have("alice", KEY) == {}
    os.remove(src / "b.txt")
    _, done = sync(w, fresh, src)
    assert done["deleted"] == [] and os.path.exists(os.path.join(ws.path("alice", KEY), "b.txt"))
    victim = put(tmp_path, "victim.txt", "precious")
    with open(state) as f:
        planted = json.load(f)
    planted["files"]["../../../../victim.txt"] = planted["files"]["a.txt"]  # a state edited behind our back
    with open(state, "w") as f:
        json.dump(planted, f)
    os.remove(src / "a.txt")
    sync(w, Workspaces(root=ws.root), src)
    assert open(victim).read() == "precious"


HOSTILE = [
    "../escape.txt",
    "a/../../escape.txt",
    "/etc/passwd",
    "a\x00b",
    "a//b",
    "./a",
    "a/./b",
    "a/",
    "",
    "a/..",
    "nl\nname",
    "/".join(["d"] * 100),
    "x" * 300,
    "a/.jgpu-tmp-0123",
]


@pytest.mark.parametrize("rel", HOSTILE, ids=[repr(r)[:30] for r in HOSTILE])
def test_hostile_relpaths_are_refused_before_anything_is_written(tmp_path, ws, rel):
    with pytest.raises(BadPath):
        check_relpath(rel)
    data = b"evil"
    manifest = {"fine.txt": (1, sha(b"f"), 0o644), rel: (len(data), sha(data), 0o644)}
    with pytest.raises(BadPath):
        ws.apply("alice", KEY, manifest, {"fine.txt": b"f", rel: data})
    assert os.listdir(ws.path("alice", KEY)) == []
    assert not os.path.exists(tmp_path / "escape.txt") and not os.path.exists(tmp_path / "workspaces" / "escape.txt")
    if rel != "a/":  # for a fetch, "a/" is the directory a
        with pytest.raises(BadPath):
            ws.read("alice", KEY, [rel])


def test_non_string_and_malformed_manifests_are_refused(ws):
    for manifest, files in [
        ({1: (1, sha(b"x"), 0o644)}, {}),
        ({"a": (1, "nothex", 0o644)}, {"a": b"x"}),
        ({"a": (-1, sha(b"x"), 0o644)}, {}),
        ({"a": (1, sha(b"x"))}, {"a": b"x"}),
        ({"a": (1, sha(b"x"), "644")}, {"a": b"x"}),
        ({"a": (2, sha(b"x"), 0o644)}, {"a": b"x"}),  # the size says 2, one byte came
        ({"a": (1, sha(b"x"), 0o644)}, {"a": b"x", "b": b"y"}),  # b is in no manifest
        ({"a": (1, sha(b"x"), 0o644)}, {}),  # the workspace lacks a and nothing came
        ({"d": (1, sha(b"x"), 0o644), "d/f": (1, sha(b"x"), 0o644)}, {"d": b"x", "d/f": b"x"}),
    ]:
        with pytest.raises(WorkspaceError):
            ws.apply("alice", KEY, manifest, files)
    assert os.listdir(ws.path("alice", KEY)) == []
    too_many = Workspaces(root=ws.root, max_files=2)
    with pytest.raises(WorkspaceError, match="max_files"):
        too_many.apply("alice", KEY, {f"f{i}": (1, sha(b"x"), 0o644) for i in range(3)}, {})
    for key in ("../x", "ABCDEF0123456789", "0123", "g" * 32, KEY + "/x"):
        with pytest.raises(BadPath):
            ws.path("alice", key)


def test_symlink_swapped_in_between_plan_and_apply(tmp_path, ws):
    src = tmp_path / "nb"
    put(src, "sub/a.txt", "a")
    put(src, "top.txt", "t")
    w = WorkdirSync()
    sync(w, ws, src)
    tree = ws.path("alice", KEY)
    victim = tmp_path / "victim"
    put(victim, "a.txt", "precious")
    put(victim, "top.txt", "precious")

    put(src, "sub/a.txt", "new a")
    m = w.scan(str(src))
    send = w.plan(m, ws.have("alice", KEY))
    assert send == ["sub/a.txt"]
    files = w.contents(m, send)
    os.rename(os.path.join(tree, "sub"), os.path.join(tree, "sub-was"))  # a cell, meanwhile
    os.symlink(victim, os.path.join(tree, "sub"))
    with pytest.raises(BadPath, match="symbolic link"):
        ws.apply("alice", KEY, m.entries, files)
    assert open(victim / "a.txt").read() == "precious" and sorted(os.listdir(victim)) == ["a.txt", "top.txt"]

    os.remove(os.path.join(tree, "top.txt"))  # a link in place of a synced file: replaced, not written through
    os.symlink(victim / "top.txt", os.path.join(tree, "top.txt"))
    os.remove(os.path.join(tree, "sub"))
    _, done = sync(w, ws, src)
    assert "top.txt" in done["written"] and not os.path.islink(os.path.join(tree, "top.txt"))
    assert open(victim / "top.txt").read() == "precious"
    assert open(os.path.join(tree, "sub/a.txt")).read() == "new a"


def local_sync(w: WorkdirSync, ws: Workspaces, src, meddle=lambda m: None) -> tuple[Manifest, dict]:
    """A same-host sync as the wire makes it: a scan that keeps nothing, then the daemon
    copying what it lacks from the notebook's directory (``meddle`` runs in between)."""
    m = w.scan(str(src), keep=False)
    send = w.plan(m, ws.have("alice", KEY))
    meddle(m)
    local = Local(m.root, *m.root_id, {rel: m.stats[rel] for rel in send})
    return m, ws.apply("alice", KEY, json.loads(json.dumps(m.entries)), {}, Local(*json.loads(json.dumps(local))))


def test_same_host_sync_copies_from_the_notebook_directory(tmp_path, ws):
    """Nothing read into the notebook's memory; the daemon copies each lacking file, checked
    against the stat it was hashed with; perms as for written files; unchanged: nothing."""
    src = tmp_path / "nb"
    blobs = {f"d{i % 3}/f{i}.bin": os.urandom(1000 * i) for i in range(12)}  # > 8 MB in all: the threads too
    blobs["big.bin"] = os.urandom(9 * 1024 * 1024)
    for rel, data in blobs.items():
        put(src, rel, data)
    put(src, "tool", "#!/bin/sh")
    os.chmod(src / "tool", 0o755)
    w = WorkdirSync()
    m, done = local_sync(w, ws, src)
    assert m.kept == {} and m.hashed == 14 and m.entries["big.bin"][1] == sha(blobs["big.bin"])
    assert done == {"written": sorted([*blobs, "tool"]), "deleted": [], "kept": [], "need": []}
    tree = ws.path("alice", KEY)
    assert all(open(os.path.join(tree, rel), "rb").read() == data for rel, data in blobs.items())
    assert stat.S_IMODE(os.stat(os.path.join(tree, "tool")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(tree, "big.bin")).st_mode) == 0o600
    assert ws.have("alice", KEY) == {r: e[1] for r, e in m.entries.items()}
    m, done = local_sync(w, ws, src)
    assert m.hashed == 0 and done == {"written": [], "deleted": [], "kept": [], "need": []}
    assert not [n for n in os.listdir(tree) if n.startswith(".jgpu-tmp-")]


def test_same_host_copy_refuses_what_is_no_longer_the_file_that_was_hashed(tmp_path, ws):
    """A file changed, grown, swapped for a link or a FIFO after the scan, a directory
    swapped for a link: not copied (named in "need", to be sent), nothing written through a
    link; another directory in the notebook's place: nothing copied."""
    src = tmp_path / "nb"
    for rel in ("same.txt", "edited.txt", "grown.txt", "linked.txt", "fifo.txt", "sub/a.txt"):
        put(src, rel, rel)
    secret = tmp_path / "secret"
    put(secret, "a.txt", "not the notebook's")
    put(tmp_path, "secret.txt", "not the notebook's")

    def meddle(m):
        with open(src / "edited.txt", "r+b") as f:  # same size, new mtime and ctime
            f.write(b"EDITED")
        with open(src / "grown.txt", "ab") as f:
            f.write(b"+")
        os.remove(src / "linked.txt")
        os.symlink(tmp_path / "secret.txt", src / "linked.txt")
        os.remove(src / "fifo.txt")
        os.mkfifo(src / "fifo.txt")  # would block a reader: never opened for reading
        os.rename(src / "sub", tmp_path / "sub-was")
        os.symlink(secret, src / "sub")

    _, done = local_sync(WorkdirSync(), ws, src, meddle)
    assert done["written"] == ["same.txt"]
    assert done["need"] == ["edited.txt", "fifo.txt", "grown.txt", "linked.txt", "sub/a.txt"]
    tree = ws.path("alice", KEY)
    assert sorted(os.listdir(tree)) == ["same.txt", "sub"] and os.listdir(os.path.join(tree, "sub")) == []
    assert set(ws.have("alice", KEY)) == {"same.txt"}  # the rest is still lacking

    other = tmp_path / "other"  # a directory with the same files is not the one that was scanned
    put(other, "x.txt", "x")
    m = WorkdirSync().scan(str(other), keep=False)
    local = Local(str(src), *m.root_id, {"x.txt": m.stats["x.txt"]})
    done = ws.apply("alice", KEY, m.entries, {}, local)
    assert done["need"] == ["x.txt"] and done["written"] == []
    with pytest.raises(WorkspaceError, match="not the manifest's"):  # a stat that does not fit the manifest
        ws.apply("alice", KEY, m.entries, {}, Local(m.root, *m.root_id, {"x.txt": (2, 0, 0, 0)}))
    with pytest.raises(WorkspaceError, match="no contents sent"):  # neither sent nor to be copied
        ws.apply("alice", KEY, m.entries, {}, Local(m.root, *m.root_id, {}))


def test_same_host_copy_counts_against_the_quota(tmp_path):
    ws = Workspaces(root=str(tmp_path / "workspaces"), quota_bytes=1000)
    src = tmp_path / "nb"
    put(src, "big.bin", b"b" * 1200)
    with pytest.raises(QuotaExceeded):
        local_sync(WorkdirSync(), ws, src)
    assert os.listdir(ws.path("alice", KEY)) == []


def test_a_directory_a_cell_made_where_the_notebook_has_a_file(tmp_path, ws):
    tree = ws.path("alice", KEY)
    put(tree, "out/cell.txt", "the cell's")
    with pytest.raises(BadPath, match="is a directory"):
        ws.apply("alice", KEY, {"out": (1, sha(b"x"), 0o644)}, {"out": b"x"})
    assert open(os.path.join(tree, "out/cell.txt")).read() == "the cell's"
    assert [n for n in os.listdir(tree) if n.startswith(".jgpu-tmp-")] == []
    put(tree, "data", "a file")  # and a file where the manifest needs a directory
    with pytest.raises(BadPath, match="not a directory"):
        ws.apply("alice", KEY, {"data/x": (1, sha(b"x"), 0o644)}, {"data/x": b"x"})


def test_quota_counts_all_of_a_users_workspaces_and_names_the_trait(tmp_path):
    ws = Workspaces(root=str(tmp_path / "workspaces"), quota_bytes=1000)
    big = {"f.bin": (600, sha(b"a" * 600), 0o644)}
    ws.apply("alice", KEY, big, {"f.bin": b"a" * 600})
    ws.apply("bob", KEY, big, {"f.bin": b"a" * 600})  # another user's bytes are not alice's
    other = "f" * 32
    with pytest.raises(QuotaExceeded) as e:
        ws.apply("alice", other, big, {"f.bin": b"a" * 600})
    msg = str(e.value)
    assert "'alice'" in msg and "Workspaces.quota_bytes = 1.0 kB" in msg and "1.2 kB" in msg and "600 B" in msg
    assert os.listdir(ws.path("alice", other)) == []
    ws.apply("alice", KEY, {"f.bin": (900, sha(b"b" * 900), 0o644)}, {"f.bin": b"b" * 900})  # replaces: fits
    assert ws.usage("alice") == 900
    assert Workspaces.class_traits()["quota_bytes"].help


def test_two_users_never_see_each_others_trees(tmp_path, ws):
    src = tmp_path / "nb"
    put(src, "alice-only.txt", "mine")
    w = WorkdirSync()
    sync(w, ws, src, user="alice")
    a, b = ws.path("alice", KEY), ws.path("bob", KEY)
    assert a != b and os.listdir(b) == []
    assert ws.have("bob", KEY) == {} and ws.snapshot("bob", KEY) == {}
    with pytest.raises(WorkspaceError):
        ws.read("bob", KEY, ["alice-only.txt"])
    with pytest.raises(WorkspaceError):
        ws.read("bob", KEY, ["*.txt"])
    for sly in ("../alice", "alice/..", "alice/../alice", ".alice", "alice\x00", "x" * 65):
        p = ws.path(sly, KEY)
        assert os.path.dirname(os.path.dirname(os.path.dirname(p))) == ws.root
        assert p not in (a, b) and os.listdir(p) == []
    assert ws.user_part("alice") == "alice" and len(ws.user_part("../alice")) == 65
    with pytest.raises(WorkspaceError):
        ws.path("", KEY)


def test_changed_since_counts_what_a_cell_wrote(tmp_path, ws):
    src = tmp_path / "nb"
    put(src, "train.py", "code")
    put(src, "data/in.csv", "1,2")
    sync(WorkdirSync(), ws, src)
    tree = ws.path("alice", KEY)
    before = ws.snapshot("alice", KEY)
    assert set(before) == {"train.py", "data/in.csv"}
    put(tree, "out/model.pt", "weights", age=0)  # the "cell"
    put(tree, "data/in.csv", "1,2,3", age=0)
    put(tree, "__pycache__/train.cpython-311.pyc", "bytecode", age=0)
    put(tree, "sub/.ipynb_checkpoints/x", "", age=0)
    put(tmp_path, "elsewhere/big.bin", "not in the workspace")
    os.symlink(tmp_path / "elsewhere", os.path.join(tree, "linked"))  # never followed
    assert ws.changed_since("alice", KEY, before) == ["data/in.csv", "out/model.pt"]
    assert ws.changed_since("alice", KEY, ws.snapshot("alice", KEY)) == []


def test_read_for_fetch(tmp_path, ws):
    tree = ws.path("alice", KEY)
    put(tree, "a.csv", "a")
    put(tree, "plots/p1.png", "p1")
    put(tree, "plots/deep/p2.png", "p2")
    put(tree, "out/x.txt", "x")
    assert ws.read("alice", KEY, ["a.csv"]) == {"a.csv": b"a"}
    with pytest.raises(WorkspaceError, match="matches"):
        ws.read("alice", KEY, ["*.png"])  # a pattern without '**' stays at the top
    assert set(ws.read("alice", KEY, ["**/*.png"])) == {"plots/p1.png", "plots/deep/p2.png"}
    assert ws.read("alice", KEY, ["out/", "a.csv", "*.csv"]) == {"out/x.txt": b"x", "a.csv": b"a"}
    with pytest.raises(WorkspaceError, match="no file"):
        ws.read("alice", KEY, ["missing.txt"])
    with pytest.raises(WorkspaceError, match="max_fetch_bytes"):
        ws.read("alice", KEY, ["plots"], max_bytes=3)
    small = Workspaces(root=ws.root, max_fetch_bytes=1)
    with pytest.raises(WorkspaceError, match="max_fetch_bytes"):
        small.read("alice", KEY, ["**"])
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    os.symlink(secret, os.path.join(tree, "link.txt"))
    os.symlink(tmp_path, os.path.join(tree, "linkdir"))
    with pytest.raises(BadPath):
        ws.read("alice", KEY, ["link.txt"])
    with pytest.raises(BadPath):
        ws.read("alice", KEY, ["linkdir/secret.txt"])
    assert "link.txt" not in ws.read("alice", KEY, ["**"])  # patterns never meet links
    os.mkfifo(os.path.join(tree, "pipe"))  # a cell's FIFO: refused, without blocking the daemon
    with pytest.raises(BadPath, match="not a regular file"):
        ws.read("alice", KEY, ["pipe"])


def test_store_writes_fetched_files_back_safely(tmp_path):
    nb = tmp_path / "nb"
    nb.mkdir()
    w = WorkdirSync()
    assert w.store(str(nb), {"out/model.pt": b"w", "r.csv": memoryview(b"1,2")}) == ["out/model.pt", "r.csv"]
    assert (nb / "out" / "model.pt").read_bytes() == b"w" and (nb / "r.csv").read_text() == "1,2"
    assert stat.S_IMODE(os.stat(nb / "r.csv").st_mode) == 0o666 & ~_umask()
    with pytest.raises(BadPath):
        w.store(str(nb), {"../evil": b"x"})
    os.symlink(tmp_path, nb / "link")
    with pytest.raises(BadPath):
        w.store(str(nb), {"link/evil": b"x"})
    assert not (tmp_path / "evil").exists()


# ----------------------------------------------------------------------------- a worker elsewhere


def test_a_cells_files_written_back_from_a_worker_elsewhere(tmp_path, ws):
    """What a cell on another node wrote lands as a cell's own files (the next sync leaves
    them be), what it removed goes, and a hostile name or the quota refuses it all."""
    src = tmp_path / "nb"
    put(src, "in.csv", "1,2")
    sync(WorkdirSync(), ws, src)
    tree = ws.path("alice", KEY)
    put(tree, "old.txt", "o")
    ws.write_back("alice", KEY, {"out/r.txt": (b"result", 0o600), "run.sh": (memoryview(b"#!"), 0o700)}, ["old.txt"])
    assert (Path(tree) / "out/r.txt").read_bytes() == b"result" and not (Path(tree) / "old.txt").exists()
    assert stat.S_IMODE(os.stat(Path(tree) / "run.sh").st_mode) == 0o700
    assert sync(WorkdirSync(), ws, src)[1]["deleted"] == []  # a cell's results, never the sync's to remove
    for rel in ("../escape.txt", "/tmp/abs.txt", "a/../../b"):
        with pytest.raises(BadPath):
            ws.write_back("alice", KEY, {"fine.txt": (b"f", 0o600), rel: (b"bad", 0o600)}, [])
        with pytest.raises(BadPath):
            ws.write_back("alice", KEY, {}, [rel])
    assert not (Path(tree) / "fine.txt").exists() and not (tmp_path / "escape.txt").exists()
    os.symlink(tmp_path, Path(tree) / "link")
    with pytest.raises(BadPath):
        ws.write_back("alice", KEY, {"link/evil.txt": (b"x", 0o600)}, [])
    assert not (tmp_path / "evil.txt").exists()
    small = Workspaces(root=ws.root, quota_bytes=100)
    with pytest.raises(QuotaExceeded):
        small.write_back("alice", KEY, {"big.bin": (b"x" * 200, 0o600)}, [])
    assert not (Path(tree) / "big.bin").exists()


def test_a_trees_listing_sends_what_the_peer_lacks_in_batches(tmp_path, monkeypatch):
    """What the daemon answers a worker keeping its own copy: the listing (tokens cached
    by stat), the files it lacks in bounded batches, and a digest that names the listing."""
    from kernel_worker.workspace_listing import Listings
    from kernel_worker.workspace_tree import Tree

    root = tmp_path / "tree"
    for i in range(5):
        put(root, f"d/f{i}.py", f"v{i}")
    put(root, "d/__pycache__/f0.cpython-311.pyc", "bytecode")  # never listed
    listings = Listings()
    listing = listings.listing(str(root))
    assert sorted(listing.files) == [f"d/f{i}.py" for i in range(5)]
    assert json.loads(listing.frame) == listing.files and len(listing.digest) == 32
    first = listings.batch(str(root), listing.files, {}, most=1000, per_answer=2)
    assert len(first.send) == 2 and first.more
    assert [bytes(f) for f in first.frames] == [(root / rel).read_bytes() for rel in first.send]
    have = {rel: listing.files[rel][1] for rel in first.send}
    second = listings.batch(str(root), listing.files, have, most=1000, per_answer=2)
    assert set(second.send).isdisjoint(first.send) and len(second.send) == 2 and second.more
    have = {rel: entry[1] for rel, entry in listing.files.items()}
    assert listings.batch(str(root), listing.files, have, most=1000) == ([], [], False)
    with monkeypatch.context() as m:
        m.setattr(Tree, "read", lambda *a: pytest.fail("an unchanged file was read again"))
        assert listings.listing(str(root)) == listing  # unchanged: one lstat a file, the same digest
    put(root, "d/f1.py", "changed", age=0)
    again = listings.listing(str(root))
    assert again.digest != listing.digest and again.files["d/f1.py"][1] != have["d/f1.py"]
    assert listings.batch(str(root), again.files, have, most=1000).send == ["d/f1.py"]
    assert listings.batch(str(root), again.files, {}, most=9, per_answer=10).more  # bytes bound a batch (15 in all)
    with pytest.raises(WorkspaceError, match="larger than Workspaces.max_fetch_bytes.*on a volume"):
        listings.batch(str(root), again.files, {}, most=1)
    (root / "d" / "f2.py").unlink()
    assert "d/f2.py" not in listings.listing(str(root)).files
    assert set(listings.tokens[str(root)]) == {"d/f0.py", "d/f1.py", "d/f3.py", "d/f4.py"}  # only what is there
