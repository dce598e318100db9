"""The workspace sync's whole story, told on any daemon (tests/test_workdir_sync.py for
the process and docker backends, tests/test_slurm_backend.py for a node without a shared
filesystem). The notebook's directory is the ``notebook_dir`` fixture (conftest.py)."""

from __future__ import annotations

from pathlib import Path

from .shells import notes, run

CSV = "a,b\n1,2\n3,4\n"


def magics(ip):
    return ip.magics_manager.registry["GPUMagics"]


def cell_ok(ip, cell: str):
    result, cap = run(ip, cell)
    assert result.success, (result.error_in_exec, cap.stdout, cap.stderr)
    return cap


def synced_files(daemon) -> int:
    return sum(1 for line in daemon.log.lines if "workspace sync for" in line)


def check_sync_round_trip(ip, notebook_dir: Path, daemon, cwd_seen: str | None) -> None:
    """The whole story on one daemon: read data/x.csv, import helper, ignored and too-big
    files left out (said once), nothing sent for an unchanged tree, one file for one
    change, a cell's file counted and fetched back both ways."""
    m = magics(ip)
    cell_ok(ip, "%config WorkdirSync.max_file_bytes = 1000")
    cap = cell_ok(
        ip,
        "%%gpu cpu\nimport os, helper\nprint(open('data/x.csv').read().splitlines()[1], helper.ANSWER, "
        "os.path.exists('secret.txt'), os.path.exists('big.bin'), os.getcwd())",
    )
    first, _, cwd = cap.stdout.strip().rpartition(" ")
    assert first == "1,2 42 False False"
    assert cwd != str(notebook_dir)  # a copy, not the notebook's own directory
    if cwd_seen is not None:
        assert cwd == cwd_seen
    said = " ".join(notes(cap))
    assert "big.bin (5.0 kB, over WorkdirSync.max_file_bytes = 1.0 kB)" in said, said
    assert "secret.txt" not in said  # excluded on purpose: not a surprise worth a note
    stats = dict(m.workdir.stats)
    assert stats["requests"] == 2 and stats["files"] == 3  # .jupyter-gpu-ignore, data/x.csv, helper.py
    logged = synced_files(daemon)

    # Unchanged tree: a scan, and not one message.
    cap = cell_ok(ip, "%%gpu cpu\nprint(len(open('data/x.csv').read()))")
    assert cap.stdout == f"{len(CSV)}\n"
    assert m.workdir.stats["requests"] == stats["requests"] and m.workdir.stats["scans"] == stats["scans"] + 1
    assert synced_files(daemon) == logged
    assert not any("big.bin" in n for n in notes(cap))  # said when it was synced

    # One file changed: only it travels.
    (notebook_dir / "data" / "x.csv").write_text(CSV + "5,6\n")
    cap = cell_ok(ip, "%%gpu cpu\nprint(open('data/x.csv').read().splitlines()[-1])")
    assert cap.stdout == "5,6\n"
    assert m.workdir.stats["files"] == stats["files"] + 1 and m.workdir.stats["requests"] == stats["requests"] + 2

    # A cell's files: counted in the cost line, brought back by %gpu fetch and --fetch.
    cap = cell_ok(
        ip,
        "%%gpu cpu\nos.makedirs('out', exist_ok=True)\nopen('out/result.txt', 'w').write('r1')\n"
        "open('out/plot.png', 'wb').write(b'png')",
    )
    said = " ".join(notes(cap))
    assert "2 files created or changed in the workspace (out/plot.png, out/result.txt): `%gpu fetch`" in said, said
    assert not (notebook_dir / "out").exists()
    cap = cell_ok(ip, "%gpu fetch out/result.txt")
    assert (notebook_dir / "out" / "result.txt").read_text() == "r1"
    assert "fetched 1 file" in cap.stdout
    cap = cell_ok(ip, "%%gpu cpu --fetch out/*.csv\nopen('out/table.csv', 'w').write('t')")
    assert (notebook_dir / "out" / "table.csv").read_text() == "t"
    said = " ".join(notes(cap))
    assert "fetched 1 file into nb: out/table.csv" in said and "1 file created or changed" in said, said
    # --no-sync: no scan, no request.
    before = dict(m.workdir.stats)
    cell_ok(ip, "%%gpu cpu --no-sync\nx = 1")
    assert m.workdir.stats == before
