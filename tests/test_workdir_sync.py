"""The notebook's directory as the worker's, where the worker cannot share it: synced to a
per-user workspace on the daemon's host (real daemons: one whose files the notebook
cannot see, a docker backend on a real engine, two CURVE users), only changed files
travelling, excludes and limits said in the cost line, what a cell wrote counted and
fetched back, hostile relpaths refused with nothing written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from support.curve import curve_users
from support.daemons import docker_args
from support.shells import notes, run
from support.workdir_story import cell_ok, check_sync_round_trip, magics

from jupyter_gpu.client import DaemonClient, DaemonError
from jupyter_gpu.workdir import WorkdirSync, notebook_key
from jupyter_gpu.workdir_wire import WorkdirWire
from kernel_worker import protocol as P


@pytest.mark.daemon_args("--Workspaces.root={tmp}/workspaces")
def test_a_daemon_on_another_host_runs_cells_in_the_synced_directory(elsewhere_daemon, make_shell, notebook_dir):
    ip = make_shell(elsewhere_daemon)
    assert magics(ip).client.bulk_root() is None  # not the same host: no shortcut
    key = notebook_key(str(notebook_dir))
    user_dir = Path(elsewhere_daemon.connection_file).parent / "workspaces"
    check_sync_round_trip(ip, notebook_dir, elsewhere_daemon, None)
    tree = next(user_dir.glob(f"*/{key}/tree"))
    assert (tree / "data" / "x.csv").exists() and not (tree / "secret.txt").exists()
    assert oct(tree.stat().st_mode & 0o777) == "0o700"


def test_the_docker_backend_runs_cells_in_the_synced_directory(
    engine, daemon_factory, make_shell, notebook_dir, tmp_path
):
    d = daemon_factory(*docker_args(engine, f"--Workspaces.root={tmp_path}/workspaces"))
    ip = make_shell(d)
    assert magics(ip).client.bulk_root() is not None  # same host, yet a container: it syncs
    check_sync_round_trip(ip, notebook_dir, d, "/workspace")
    # The container sees its own workspace only: no other user's directory, no root.
    cap = cell_ok(ip, "%%gpu cpu\nimport os\nprint(sorted(os.listdir('/workspace')), os.path.exists('/workspaces'))")
    assert cap.stdout.strip().endswith("False") and "'data'" in cap.stdout
    # A worker started by a --no-sync cell has no workspace: a later syncing cell says so.
    cell_ok(ip, "%gpu release")
    cell_ok(ip, "%%gpu cpu --no-sync\nx = 1")
    cap = cell_ok(ip, "%%gpu cpu\nimport os\nprint(os.getcwd())")
    assert cap.stdout == "/tmp\n"
    assert any("started without the notebook's directory" in n for n in notes(cap)), notes(cap)
    cell_ok(ip, "%gpu release")
    cap = cell_ok(ip, "%%gpu cpu\nimport os\nprint(os.getcwd(), open('data/x.csv').read().count(chr(10)))")
    assert cap.stdout == "/workspace 4\n"


def sync_msg(key: str, manifest: dict, files: dict | None = None, raw: bytes | None = None) -> P.Message:
    files = files or {}
    body = raw if raw is not None else json.dumps(manifest).encode()
    return P.Message(P.Msg.SYNC, {"key": key, "files": list(files)}, "s1", buffers=[body, *files.values()])


def entry(data: bytes) -> list:
    return [len(data), hashlib.sha256(data).hexdigest(), 0o644]


def test_hostile_sync_requests_are_refused_and_nothing_is_written(daemon_factory, tmp_path):
    root = tmp_path / "workspaces"
    d = daemon_factory(f"--Workspaces.root={root}")
    c = d.client()
    key = "ab" * 16
    outside = tmp_path / "evil"
    for rel in ("../evil", "/tmp/evil", "a/../../evil", "", "a//b", "x\x00y", ".", "a/./b", "d\n"):
        data = b"pwned"
        for files in ({}, {rel: data}):
            with pytest.raises(DaemonError) as e:
                c.request(sync_msg(key, {rel: entry(data)}, files), timeout=10)
            assert e.value.code == P.Err.WORKSPACE, (rel, str(e.value))
            assert "file name" in str(e.value)
    bad = [
        (sync_msg("../../etc", {"a": entry(b"a")}), "is not a workspace key"),
        (sync_msg(key, {}, raw=b"[" * 100000), "not JSON"),
        (sync_msg(key, {}, raw=b"[1, 2]"), "is not a JSON object"),
        (sync_msg(key, {"a": [1, "nope", 0o644]}), "has no content hash"),
        (sync_msg(key, {"a": [-1, "0" * 64, 0o644]}), "bad size or mode"),
        (sync_msg(key, {"a": entry(b"abc")}, {"a": b"abcdef"}), "6 bytes sent, the manifest says 3"),
        (sync_msg(key, {"a": entry(b"a")}, {"b": b"a"}), "no contents sent for 'a'"),
        (sync_msg(key, {"a": entry(b"a"), "b": entry(b"b")}, {"a": b"a", "c": b"b"}), "no contents sent for 'b'"),
        (sync_msg(key, {"a": entry(b"a")}, {"a": b"a", "c": b"c"}), "'c' was sent but is not in the manifest"),
        (sync_msg(key, {"a": entry(b"a"), "a/b": entry(b"b")}, {"a": b"a", "a/b": b"b"}), "both as a file"),
        (P.Message(P.Msg.SYNC, {"key": key, "files": ["a", "b"]}, "s1", buffers=[b"{}"]), "one frame for each"),
        (P.Message(P.Msg.FETCH, {"key": key, "paths": ["../x"]}, "s1"), "refusing file name"),
        (P.Message(P.Msg.FETCH, {"key": key, "paths": "x"}, "s1"), "a fetch names"),
    ]
    for msg, text in bad:
        with pytest.raises(DaemonError) as e:
            c.request(msg, timeout=10)
        assert e.value.code == P.Err.WORKSPACE and text in str(e.value), (text, str(e.value))
    assert not outside.exists() and not Path("/tmp/evil").exists()
    written = [p for p in root.rglob("*") if p.is_file()]
    assert written == [], written
    # The daemon still serves, and a good sync lands.
    assert c.request(sync_msg(key, {"ok.txt": entry(b"ok")}), timeout=10).content["need"] == ["ok.txt"]
    done = c.request(sync_msg(key, {"ok.txt": entry(b"ok")}, {"ok.txt": b"ok"}), timeout=10).content
    assert done["written"] == 1
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == ["ok.txt", "state.json"]


def test_on_the_same_host_the_daemon_copies_the_files_itself(daemon_factory, tmp_path):
    """The wire's same-host sync against a real daemon: the files never travel, the daemon
    copies them from the notebook's directory; a file changed after it was hashed is sent
    as bytes instead; unchanged, no request; one file changed, that file alone."""
    d = daemon_factory(f"--Workspaces.root={tmp_path}/ws")
    c = d.client()
    nb = tmp_path / "nb"
    blobs = {f"d{i % 4}/f{i}.bin": os.urandom(3000 * i) for i in range(40)}
    for rel, data in blobs.items():
        (nb / rel).parent.mkdir(parents=True, exist_ok=True)
        (nb / rel).write_bytes(data)
    key = notebook_key(str(nb / "a.ipynb"))
    replies = []

    def request(msg: P.Message) -> P.Message:
        reply = c.request(msg, timeout=30)
        replies.append(reply.content)
        if len(replies) == 1:  # between the scan and the copy, the notebook writes a file
            (nb / "d1" / "f1.bin").write_bytes(b"rewritten")
        return reply

    wire = WorkdirWire(WorkdirSync())
    assert wire.push(request, ("u",), "s1", key, str(nb), local=True) == ""
    assert replies[0]["local"] is True and replies[1]["need"] == ["d1/f1.bin"] and len(replies) == 3
    assert wire.stats == {"scans": 1, "requests": 3, "files": 40, "bytes": len(b"rewritten"), "copied": 39}
    tree = next((tmp_path / "ws").glob(f"*/{key}/tree"))
    blobs["d1/f1.bin"] = b"rewritten"
    assert all((tree / rel).read_bytes() == data for rel, data in blobs.items())
    d.log.wait_for(r"workspace sync for .*: 39 file\(s\) written \(0 B sent, 39 copied on this host\).*1 to be sent")
    assert wire.push(request, ("u",), "s1", key, str(nb), local=True) == "" and len(replies) == 3
    (nb / "d2" / "f2.bin").write_bytes(b"two")
    wire.push(request, ("u",), "s1", key, str(nb), local=True)
    assert len(replies) == 5 and wire.stats["copied"] == 40 and (tree / "d2" / "f2.bin").read_bytes() == b"two"


def test_hostile_copy_requests_read_nothing_they_should_not(daemon_factory, tmp_path):
    """A "copy" naming another directory, a link, a relative path, or stats for files the
    manifest lacks: refused, or nothing copied (each file "needed" instead)."""
    root = tmp_path / "ws"
    d = daemon_factory(f"--Workspaces.root={root}")
    c = d.client()
    key = "ef" * 16
    nb = tmp_path / "nb"
    nb.mkdir()
    (nb / "a.txt").write_text("notebook's")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.txt").write_text("notebook's")
    os.symlink(nb, tmp_path / "link")
    st, a = os.stat(nb), os.stat(nb / "a.txt")
    stats = {"a.txt": [a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino]}
    manifest = {"a.txt": entry(b"notebook's")}

    def copy(root_: object, frame: object = stats, dev: object = st.st_dev, ino: object = st.st_ino) -> P.Message:
        raw = json.dumps(frame).encode()
        content = {"key": key, "files": [], "copy": {"root": root_, "dev": dev, "ino": ino}}
        return P.Message(P.Msg.SYNC, content, "s1", buffers=[json.dumps(manifest).encode(), raw])

    for where in (str(tmp_path / "elsewhere"), str(tmp_path / "link"), "/"):
        assert c.request(copy(where), timeout=10).content["need"] == ["a.txt"], where
    bad = [
        (copy("nb"), "absolute path"),
        (copy(str(nb), dev="1"), "absolute path"),
        (copy(str(nb), {"b.txt": stats["a.txt"]}), "of a manifest file"),
        (copy(str(nb), {"a.txt": [1, 2, 3]}), "of a manifest file"),
        (copy(str(nb), {"a.txt": [2, *stats["a.txt"][1:]]}), "not the manifest's"),
        (copy(str(nb), [1]), "not a JSON object"),
    ]
    for msg, text in bad:
        with pytest.raises(DaemonError) as e:
            c.request(msg, timeout=10)
        assert e.value.code == P.Err.WORKSPACE and text in str(e.value), (text, str(e.value))
    assert [p for p in root.rglob("*") if p.is_file() and p.name != "state.json"] == []
    assert c.request(copy(str(nb)), timeout=10).content["need"] == []
    assert next(root.glob(f"*/{key}/tree/a.txt")).read_text() == "notebook's"
    # An operator may turn copying off: the notebook is told so, and sends the files.
    off = daemon_factory(f"--Workspaces.root={tmp_path}/ws-off", "--Workspaces.copy_local=False")
    oc = off.client()
    with pytest.raises(DaemonError) as e:
        oc.request(copy(str(nb)), timeout=10)
    assert "does not copy from the notebook's directory" in str(e.value)
    wire = WorkdirWire(WorkdirSync())
    wire.push(lambda m: oc.request(m, timeout=10), ("u",), "s1", key, str(nb), local=True)
    assert wire.stats["copied"] == 0 and wire.stats["files"] == 1 and wire.stats["requests"] == 2
    assert next((tmp_path / "ws-off").glob(f"*/{key}/tree/a.txt")).read_text() == "notebook's"


def test_another_users_workspace_is_not_reachable(daemon_factory, tmp_path):
    kd, server_pub, users = curve_users(tmp_path, ("alice", "bob"))
    root = tmp_path / "workspaces"
    d = daemon_factory(
        "--url=tcp://127.0.0.1:0",
        "--WorkerDaemon.curve=True",
        "--WorkerDaemon.single_tenant=True",
        f"--WorkerDaemon.keys_dir={kd}",
        f"--Workspaces.root={root}",
    )

    def client(name: str) -> DaemonClient:
        public, secret = users[name]
        c = DaemonClient(d.url, b"", heartbeat_interval=0.5, heartbeat_timeout=5.0, curve=(server_pub, public, secret))
        d.clients.append(c)
        return c

    alice, bob = client("alice"), client("bob")
    key = notebook_key("/home/alice/nb")
    secret = b"alice's data"
    manifest = {"secret.txt": entry(secret)}
    alice.request(sync_msg(key, manifest), timeout=10)
    alice.request(sync_msg(key, manifest, {"secret.txt": secret}), timeout=10)
    got = alice.request(P.Message(P.Msg.FETCH, {"key": key, "paths": ["secret.txt"]}, "s1"), timeout=10)
    assert bytes(got.buffers[0]) == secret
    # Bob, with the same key: his own (empty) workspace; he cannot name alice's.
    with pytest.raises(DaemonError) as e:
        bob.request(P.Message(P.Msg.FETCH, {"key": key, "paths": ["secret.txt"]}, "s1"), timeout=10)
    assert e.value.code == P.Err.WORKSPACE and "has no file 'secret.txt'" in str(e.value)
    for path in ("../alice/" + key + "/tree/secret.txt", "**/secret.txt", "*"):
        with pytest.raises(DaemonError):
            bob.request(P.Message(P.Msg.FETCH, {"key": key, "paths": [path]}, "s1"), timeout=10)
    # Bob asking to sync the same file is told it lacks it: nothing of alice's counts as his.
    assert bob.request(sync_msg(key, manifest), timeout=10).content["need"] == ["secret.txt"]
    # A CurveZMQ user is not the daemon's OS user: the daemon reads no path for them.
    offer = P.Message(
        P.Msg.SYNC, {"key": key, "files": [], "local": True}, "s1", buffers=[json.dumps(manifest).encode()]
    )
    assert bob.request(offer, timeout=10).content["local"] is False
    stolen = tmp_path / "alice-home"
    stolen.mkdir()
    (stolen / "secret.txt").write_bytes(secret)
    st, f = os.stat(stolen), os.stat(stolen / "secret.txt")
    where = {"root": str(stolen), "dev": st.st_dev, "ino": st.st_ino}
    frames = [
        json.dumps(manifest).encode(),
        json.dumps({"secret.txt": [len(secret), f.st_mtime_ns, f.st_ctime_ns, f.st_ino]}).encode(),
    ]
    with pytest.raises(DaemonError) as e:
        bob.request(P.Message(P.Msg.SYNC, {"key": key, "files": [], "copy": where}, "s1", buffers=frames), timeout=10)
    assert e.value.code == P.Err.WORKSPACE and "does not copy from the notebook's directory" in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["alice", "bob"]
    assert oct((root / "alice").stat().st_mode & 0o777) == "0o700"
    assert not (root / "bob" / key / "tree" / "secret.txt").exists()
    os.listdir(root / "alice" / key / "tree")  # still alice's alone


def test_a_sync_past_the_users_quota_fails_the_cell_and_says_why(daemon_factory, make_shell, notebook_dir, tmp_path):
    d = daemon_factory(f"--Workspaces.root={tmp_path}/ws", "--Workspaces.quota_bytes=20")
    ip = make_shell(d)
    cell_ok(ip, "%config GPUMagics.sync_workdir = True")
    magics(ip)._backend_of = lambda client: "elsewhere"  # as a daemon the notebook cannot share files with
    result, cap = run(ip, "%%gpu cpu\nprint('ran')")
    assert not result.success and "ran" not in cap.stdout
    text = str(result.error_in_exec)
    assert "could not be synced to the worker: workspace quota exceeded" in text and "Nothing was run" in text, text
    assert "c.Workspaces.quota_bytes" in text and "--no-sync" in text
    assert "ran" in cell_ok(ip, "%%gpu cpu --no-sync\nprint('ran')").stdout


def test_a_warm_container_gets_the_workspace_of_the_session_that_takes_it(
    engine, daemon_factory, make_shell, notebook_dir, tmp_path
):
    root = tmp_path / "workspaces"
    d = daemon_factory(
        *docker_args(engine, "--simulate-gpus=H100:1", "--WorkerDaemon.keep_warm=H100=1", f"--Workspaces.root={root}")
    )
    d.log.wait_for(r"warm H100 worker ready", timeout=60)
    ip = make_shell(d)
    cap = cell_ok(ip, "%%gpu H100\nimport os\nprint(open('data/x.csv').read().count(chr(10)), os.getcwd())")
    assert cap.stdout == "3 /workspace\n"
    assert any(n.startswith("warm start") for n in notes(cap)), notes(cap)
    cap = cell_ok(ip, "%%gpu H100\nopen('made.txt', 'w').write('m')")
    said = " ".join(notes(cap))
    assert "1 file created or changed in the workspace (made.txt)" in said, said
    assert [p.name for p in (root / ".spare").iterdir()] == []  # the spare became the workspace


def test_workspaces_live_in_the_daemons_state_directory_by_default(daemon_factory):
    from kernel_worker.daemon.paths import default_state_dir

    d = daemon_factory()
    c = d.client()
    key = "cd" * 16
    c.request(sync_msg(key, {"f.txt": entry(b"f")}), timeout=10)
    c.request(sync_msg(key, {"f.txt": entry(b"f")}, {"f.txt": b"f"}), timeout=10)
    trees = list(Path(default_state_dir(d.connection_file), "workspaces").glob(f"*/{key}/tree/f.txt"))
    assert len(trees) == 1 and trees[0].read_bytes() == b"f"
