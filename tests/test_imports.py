"""A cell's imports are checked on the worker before it runs: a module the notebook has and
the worker lacks stops the cell, naming it, the notebook's version and what to do; a
version that differs is one line in the cell's cost line. Real daemon, real shell, real
worker; the worker's environment differs from the notebook's through a package directory
only the notebook has on its sys.path, or one only the worker sees through the notebook's
directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.shells import notes, plain, run

from jupyter_gpu import imports
from jupyter_gpu.client import DaemonClient
from kernel_worker import protocol as P


def _package(root: Path, name: str, version: str | None) -> None:
    """An installed package ``name`` under ``root`` (with a dist-info when ``version``)."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"WHERE = {str(root)!r}\n")
    if version is not None:
        info = root / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "top_level.txt").write_text(f"{name}\n")


@pytest.fixture
def spy(monkeypatch) -> list[dict]:
    """The content of every EXECUTE the notebook sends."""
    sent: list[dict] = []
    request = DaemonClient.request

    def spied(self, msg, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if msg.type == P.Msg.EXECUTE:
            sent.append(dict(msg.content))
        return request(self, msg, *a, **kw)

    monkeypatch.setattr(DaemonClient, "request", spied)
    return sent


@pytest.fixture
def ip(daemon_factory, make_shell, tmp_path, monkeypatch):
    nb = tmp_path / "nb"
    nb.mkdir()
    monkeypatch.chdir(nb)  # the notebook's directory, which the worker follows
    imports._CACHE.clear()
    return make_shell(daemon_factory())


def test_a_module_the_worker_lacks_stops_the_cell_before_anything_runs(ip, tmp_path, monkeypatch, spy):
    site = tmp_path / "notebook-only"
    _package(site, "onlyhere_pkg", "1.4.2")
    monkeypatch.syspath_prepend(str(site))
    marker = tmp_path / "ran"
    result, cap = run(ip, f"%%gpu any\nopen({str(marker)!r}, 'w').close()\nimport onlyhere_pkg\nprint('CELL-RAN')")
    assert not result.success
    assert type(result.error_in_exec).__name__ == "ModuleNotFoundError"
    assert str(result.error_in_exec) == (
        "onlyhere_pkg is imported by this cell but not installed on the worker (the notebook has onlyhere_pkg "
        "1.4.2); nothing ran. Install it on the worker: run `%pip install onlyhere_pkg==1.4.2` in a %%gpu cell, "
        "or (docker backend) run the cell in an image that has it: `%%gpu --image IMAGE` (`jupyter gpu image build "
        "--from IMAGE` adds what jupyter-gpu needs to any image)."
    )
    assert not marker.exists()
    assert "CELL-RAN" not in cap.stdout
    assert spy[-1]["imports"] == {"onlyhere_pkg": "onlyhere_pkg==1.4.2"}
    # Nothing ran and nothing was lost: the session goes on.
    result, cap = run(ip, "%%gpu any\nprint('next')")
    assert result.success and cap.stdout == "next\n"


def test_a_module_present_on_both_in_the_same_version_runs_silently(ip, spy):
    result, cap = run(ip, "%%gpu any\nimport numpy as np\nfrom xxhash import xxh3_64\nprint(np.arange(3).sum())")
    assert result.success, cap.stderr
    assert cap.stdout == "3\n"
    assert "[jupyter-gpu]" not in cap.stderr
    assert not [n for n in notes(cap) if "notebook" in n]
    assert set(spy[-1]["imports"]) == {"numpy", "xxhash"}
    assert spy[-1]["imports"]["numpy"].startswith("numpy==")


def test_a_version_that_differs_is_one_note(ip, tmp_path, monkeypatch):
    site = tmp_path / "notebook-site"
    _package(site, "twover_pkg", "2.2.3")
    monkeypatch.syspath_prepend(str(site))  # the notebook's 2.2.3
    _package(Path.cwd(), "twover_pkg", "2.2.1")  # beside the notebook: the worker, working there, finds 2.2.1
    result, cap = run(ip, "%%gpu any\nimport twover_pkg\nprint(twover_pkg.WHERE)")
    assert result.success, cap.stderr
    assert cap.stdout == f"{Path.cwd()}\n"
    assert notes(cap).count("twover_pkg 2.2.1 on the worker, 2.2.3 in the notebook") == 1


def test_a_module_beside_the_notebook_is_found_by_the_worker(ip, monkeypatch, spy):
    Path("helper_beside.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(Path.cwd()))  # a kernel imports from its notebook's directory
    result, cap = run(ip, "%%gpu any\nimport helper_beside\nprint(helper_beside.VALUE)")
    assert result.success, (cap.stdout, cap.stderr)
    assert cap.stdout == "42\n"
    assert spy[-1]["imports"] == {"helper_beside": ""}


def test_stdlib_relative_and_guarded_imports_are_not_checked(ip, spy):
    result, cap = run(ip, "%%gpu any\nimport os, json\nfrom collections import abc\nprint('ok')")
    assert result.success and cap.stdout == "ok\n"
    assert "imports" not in spy[-1]
    cell = (
        "from __future__ import annotations\nfrom . import sibling\n"
        "try:\n    import not_anywhere_zz\nexcept ImportError:\n    pass"
    )
    assert imports.imports_of(cell) == {}
    assert imports.imports_of("def f():\n    import numpy\n") == {}
    assert imports.imports_of("%pip install numpy\nimport numpy") == {}  # it may be installing it there
    assert imports.imports_of("import not_anywhere_zz") == {}  # the notebook cannot import it either
    assert imports.imports_of("!ls\nimport numpy.linalg as la", ip.transform_cell)["numpy"].startswith("numpy==")


def test_a_cell_without_imports_sends_no_imports(ip, spy):
    for cell in ("%%gpu any\npass", "%%gpu any\nx = 1 + 1\nprint(x)"):
        result, cap = run(ip, cell)
        assert result.success, cap.stderr
        assert "imports" not in spy[-1]


def test_a_missing_local_module_says_where_to_put_it(ip, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "stray_helper.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    result, cap = run(ip, "%%gpu any\nimport stray_helper")
    assert not result.success
    text = plain(str(result.error_in_exec))
    assert text.startswith("stray_helper is imported by this cell but not installed on the worker (the notebook has")
    assert "nothing ran" in text and "notebook's directory" in text
