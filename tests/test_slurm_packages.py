"""`%gpu pip install` on a Slurm node without a shared filesystem, through the real Slurm
gateway (tests/support/slurm_gateway.py): the user's package directory on the login node
reaches the worker over its own socket (kernel_worker/executor/mirror.py and
daemon/mirror.py), before each cell, only what changed travelling; it is importable in the
next cell of the same job, survives a daemon restart, comes in batches when large, and is
read-only: neither the code in a cell nor what it forges as its worker writes there.

The packages come from the machine's own index (/opt/pypi), as in tests/test_pip.py, and
the notebook lacks them, so only the worker can import them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support.shells import run

from kernel_worker.daemon.paths import default_state_dir
from kernel_worker.workspace_listing import FILES_PER_ANSWER

FIRST, FIRST_VERSION = "termcolor", "3.3.0"
SECOND, SECOND_VERSION = "tabulate", "0.10.0"
DEADLINE_S = 60
SENT = r"session \S+: (\d+) file\(s\) of its packages sent to its worker"
IMPORTED = "%%gpu cpu\nimport importlib.metadata, os, {0}\nprint(importlib.metadata.version({0!r}), {0}.__file__)"


@pytest.fixture
def notebook(tmp_path, monkeypatch) -> Path:
    """A small notebook directory as the kernel's cwd (not the repository's)."""
    nb = tmp_path / "nb"
    nb.mkdir()
    (nb / "data.txt").write_text("d")
    monkeypatch.chdir(nb)
    return nb


def packages_dir(d) -> Path:
    """The user's package directory on the daemon's host, for the workers' Python."""
    return next((Path(default_state_dir(d.connection_file)) / "packages").glob("*/py*"))


def contents(root: Path) -> dict[str, tuple[bytes, int]]:
    """relpath -> (bytes, mode) of every file under ``root`` but Python's own caches."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def pip_install(ip, spec: str) -> None:
    name, _, version = spec.partition("==")
    result, cap = run(ip, f"%gpu pip install {spec}")
    assert result.success, (cap.stdout, result.error_in_exec)
    assert f"Successfully installed {name}-{version}" in cap.stdout, cap.stdout


def imported(ip, name: str) -> tuple[str, str]:
    """(version, module file) of ``name`` as a cell on the worker imports it."""
    result, cap = run(ip, IMPORTED.format(name))
    assert result.success, (result.error_in_exec, cap.stdout, cap.stderr)
    version, where = cap.stdout.split()
    return version, where


def sent(d, nth: int) -> int:
    return int(d.log.wait_for(SENT, timeout=DEADLINE_S, nth=nth).group(1))


def test_a_pip_installed_package_is_imported_on_a_node_without_a_shared_filesystem(gateway, make_shell, notebook):
    d = gateway()
    ip = make_shell(d)
    with pytest.raises(ImportError):
        __import__(FIRST)  # the notebook lacks it: only the worker can have it
    pip_install(ip, f"{FIRST}=={FIRST_VERSION}")
    version, where = imported(ip, FIRST)
    assert version == FIRST_VERSION
    assert not where.startswith(str(packages_dir(d)))  # the node's own copy, not the login node's directory
    assert where.endswith(f"/packages/{FIRST}/__init__.py"), where
    assert sent(d, 1) == len(contents(packages_dir(d)))  # every file once
    cell = "%%gpu cpu\nimport os, sys\nmine = sys.path.index(os.path.dirname(os.path.dirname({0}.__file__)))\n"
    cell += "print(open('data.txt').read(), mine < min(i for i, p in enumerate(sys.path) if p.endswith('-packages')))"
    result, cap = run(ip, cell.format(FIRST))  # the workspace still comes along
    assert result.success and cap.stdout == "d True\n"  # and the packages shadow the Python's own, as PYTHONPATH does
    assert len([line for line in d.log.lines if "of its packages sent" in line]) == 1  # unchanged: nothing sent


def test_a_package_installed_mid_session_is_importable_in_the_next_cell_of_the_same_job(gateway, make_shell, notebook):
    d = gateway()
    ip = make_shell(d)
    assert run(ip, "%config GPUMagics.sync_workdir = False")[0].success  # packages without a workspace too
    pip_install(ip, f"{FIRST}=={FIRST_VERSION}")
    result, cap = run(ip, f"%%gpu cpu\nimport os, {FIRST}\nprint(os.environ['SLURM_JOB_ID'])")
    assert result.success, result.error_in_exec
    job = cap.stdout.strip()
    assert sent(d, 1) == len(contents(packages_dir(d)))
    before = contents(packages_dir(d))
    pip_install(ip, f"{SECOND}=={SECOND_VERSION}")
    after = contents(packages_dir(d))
    changed = [rel for rel, v in after.items() if before.get(rel) != v]
    assert changed and all(rel.startswith((SECOND, "bin/")) for rel in changed), changed
    code = f"%%gpu cpu\nimport importlib.metadata, os, {SECOND}\nprint(importlib.metadata.version({SECOND!r}))\n"
    code += f"print(os.environ['SLURM_JOB_ID'], {SECOND}.tabulate([[1, 2]], tablefmt='plain'))"
    result, cap = run(ip, code)
    assert result.success, (result.error_in_exec, cap.stderr)
    assert cap.stdout == f"{SECOND_VERSION}\n{job} 1  2\n"  # the same job, the new package
    assert sent(d, 2) == len(changed)  # only what changed travelled


def test_a_cell_forging_its_workers_messages_cannot_write_into_the_packages(gateway, make_shell, notebook):
    """Code in a cell can send what its worker sends: a MIRROR ``back`` naming the packages
    tree (or a tree that is not one) is refused, and so is a question for another Python's
    directory; nothing changes in the daemon's package directory. What a cell writes into
    its node's copy is the node's alone, and undone before the next cell."""
    d = gateway()
    ip = make_shell(d)
    pip_install(ip, f"{FIRST}=={FIRST_VERSION}")
    assert imported(ip, FIRST)[0] == FIRST_VERSION
    where = packages_dir(d)
    before = contents(where)
    users = sorted(os.listdir(where.parent.parent))
    forge = f"""%%gpu cpu
import gc, os, {FIRST}
from kernel_worker import protocol as P
from kernel_worker.executor.executor import Executor
ex = next(o for o in gc.get_objects() if isinstance(o, Executor))
cell = ex.stdin.request
init = '{FIRST}/__init__.py'
for content, frames in (
    ({{'tree': 'packages', 'back': {{init: [5, 384], 'evil.py': [5, 384]}}, 'gone': []}}, [b'owned', b'owned']),
    ({{'tree': 'packages', 'back': {{}}, 'gone': [init]}}, []),
    ({{'tree': '../packages', 'back': {{'evil.py': [5, 384]}}, 'gone': []}}, [b'owned']),
    ({{'tree': ['packages'], 'back': {{}}, 'gone': [init]}}, []),
    ({{'tree': 'packages', 'python': '../../../escape', 'have': {{}}}}, []),
):
    with ex.channel.lock:
        ex.channel.send(cell.reply(P.Msg.MIRROR, content, frames))
mine = os.path.dirname(os.path.dirname({FIRST}.__file__))
open(os.path.join(mine, init), 'w').write('raise ImportError("tampered")')
open(os.path.join(mine, 'evil.py'), 'w').write('EVIL = 1')
print('sent')
"""
    result, cap = run(ip, forge)
    assert result.success and cap.stdout == "sent\n", (result.error_in_exec, cap.stderr)
    d.log.wait_for("refused what its worker sent back for its packages: a worker's copy of them is read-only", nth=2)
    d.log.wait_for("asked to mirror .*, not a tree it may have", nth=2)
    d.log.wait_for(r"its packages could not be read for its worker: '\.\./\.\./\.\./escape' is not a Python version")
    code = f"%%gpu cpu\nimport importlib.metadata, sys\nsys.modules.pop({FIRST!r})\nimport {FIRST}\n"
    code += f"print(importlib.metadata.version({FIRST!r}), callable({FIRST}.colored))\n"
    code += "try:\n    import evil\nexcept ImportError:\n    print('no evil')"
    result, cap = run(ip, code)  # the node's copy is the daemon's again
    assert result.success, (result.error_in_exec, cap.stderr)
    assert cap.stdout == f"{FIRST_VERSION} True\nno evil\n"
    assert contents(where) == before and sorted(os.listdir(where.parent.parent)) == users
    assert not (where.parent.parent.parent / "escape").exists() and not list(where.parent.glob("*escape*"))


def test_a_package_of_thousands_of_files_comes_in_batches_and_survives_a_daemon_restart(gateway, make_shell, notebook):
    d = gateway()
    ip = make_shell(d)
    result, cap = run(ip, "%%gpu cpu\nimport os\nprint(os.getpid())")
    assert result.success
    pid = cap.stdout.strip()
    big = packages_dir(d) / "bigpkg"  # as pip would have left it: thousands of modules
    big.mkdir()
    (big / "__init__.py").write_text("")
    for i in range(FILES_PER_ANSWER + 200):
        (big / f"m{i}.py").write_text(f"X = {i}\n")
    code = f"%%gpu cpu\nimport os, bigpkg.m{FILES_PER_ANSWER + 199} as m\nprint(m.X, os.getpid())"
    result, cap = run(ip, code)
    assert result.success, (result.error_in_exec, cap.stderr)
    assert cap.stdout == f"{FILES_PER_ANSWER + 199} {pid}\n"
    assert (sent(d, 1), sent(d, 2)) == (FILES_PER_ANSWER, 201)
    assert "more to come" in d.log.wait_for(SENT + ".*", nth=1).group(0)

    d.kill()  # the job lives on; the restarted daemon adopts it, with no token of any file
    d2 = gateway()
    d2.log.wait_for(r"adopted the running worker of session", timeout=DEADLINE_S)
    result, cap = run(ip, "%%gpu cpu\nimport bigpkg.m7 as m\nprint(m.X, os.getpid())")
    assert result.success and cap.stdout == f"7 {pid}\n", (result.error_in_exec, cap.stderr)
    assert not [line for line in d2.log.lines if "of its packages sent" in line]  # the same listing: nothing sent
    (big / "m3.py").write_text("X = 'three'\n")
    (big / "m4.py").unlink()
    code = "%%gpu cpu\nimport importlib, bigpkg\nprint(importlib.import_module('bigpkg.m3').X)\n"
    code += "try:\n    import bigpkg.m4\nexcept ImportError:\n    print('gone')"
    result, cap = run(ip, code)
    assert result.success and cap.stdout == "three\ngone\n", (result.error_in_exec, cap.stderr)
    assert sent(d2, 1) == 1  # the one changed file


def test_a_package_the_notebook_has_too_is_there_before_the_workers_import_check(
    gateway, make_shell, notebook, tmp_path, monkeypatch
):
    """The notebook has the package as well, so the cell says it imports it (``imports``):
    the fresh job's worker must have its copy before it looks, or it stops the cell."""
    from jupyter_gpu import imports

    site = tmp_path / "notebook-site"  # the notebook's own termcolor, same version
    (site / f"{FIRST}-{FIRST_VERSION}.dist-info").mkdir(parents=True)
    (site / f"{FIRST}-{FIRST_VERSION}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {FIRST}\nVersion: {FIRST_VERSION}\n"
    )
    (site / f"{FIRST}-{FIRST_VERSION}.dist-info" / "RECORD").write_text("")
    (site / FIRST).mkdir()
    (site / FIRST / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    try:
        d = gateway()
        ip = make_shell(d)
        pip_install(ip, f"{FIRST}=={FIRST_VERSION}")
        result, cap = run(ip, f"%%gpu cpu\nimport {FIRST}\nprint(callable({FIRST}.colored))")
        assert result.success, result.error_in_exec
        assert cap.stdout == "True\n"  # the worker's copy, not the notebook's empty stand-in
    finally:
        sys.modules.pop(FIRST, None)
        imports._CACHE.clear()
        imports._distributions.cache_clear()
