"""`%gpu pip install`: a package from the machine's own index, installed on the daemon's
host into the user's package directory, importable by the running worker and by every
later one (after a release), with pip's output shown; anything but requirement
specifiers is refused before pip runs. `%gpu pip sync`: the notebook's version of what it
imported, where the worker's differs, with what it left and why."""

from __future__ import annotations

import json
import sys

import pytest
from support.shells import run

# A small pure-Python package the test venv does not have (so the worker can only get it here).
PACKAGE, VERSION = "pyjokes", "0.8.3"


def test_a_package_installed_with_pip_is_there_for_this_and_every_later_worker(daemon, make_shell):
    ip = make_shell(daemon)
    with pytest.raises(ImportError):
        __import__(PACKAGE)  # the notebook lacks it: only the workers get it
    assert run(ip, "%%gpu any\nx = 1")[0].success  # a worker started before the install
    result, cap = run(ip, f"%gpu pip install {PACKAGE}=={VERSION}")
    assert result.success, (cap.stdout, result.error_in_exec)
    assert f"Successfully installed {PACKAGE}-{VERSION}" in cap.stdout
    assert "on the daemon's host: every later worker of yours has it" in cap.stdout
    code = f"%%gpu any\nimport importlib.metadata, {PACKAGE}\nprint(importlib.metadata.version({PACKAGE!r}))"
    result, cap = run(ip, code)
    assert result.success and cap.stdout == f"{VERSION}\n", (cap.stdout, result.error_in_exec)
    assert run(ip, "%gpu release")[0].success
    result, cap = run(ip, code)  # a new worker
    assert result.success and cap.stdout == f"{VERSION}\n", (cap.stdout, result.error_in_exec)


@pytest.mark.parametrize(
    "specs",
    [
        "--index-url=http://127.0.0.1:1/simple pyjokes",
        "-r /etc/passwd",
        "../../x",
        "git+https://example.invalid/x.git",
        "pyjokes --target=/tmp",
        "x;rm",
    ],
)
def test_anything_but_requirements_is_refused_before_pip_runs(daemon, make_shell, specs):
    ip = make_shell(daemon)
    result, cap = run(ip, f"%gpu pip install {specs}")
    assert not result.success
    assert "is not a requirement this daemon installs: name[extras][==version]" in str(result.error_in_exec)
    assert daemon.log.lines == [line for line in daemon.log.lines if "pip install for" not in line]


def _notebook_dist(site, name: str, version: str, direct_url: dict | None = None) -> None:
    """A distribution only the notebook has: its metadata and a module of its name."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    (site / name).mkdir()
    (site / name / "__init__.py").write_text("")


def test_pip_sync_installs_the_notebooks_version_of_what_it_imported_and_says_what_it_left(
    daemon, make_shell, tmp_path, monkeypatch
):
    from jupyter_gpu import imports

    site = tmp_path / "notebook-site"  # on the notebook's path only: the worker has the index's pyjokes
    site.mkdir()
    _notebook_dist(site, PACKAGE, VERSION)
    _notebook_dist(site, "mylib", "0.1.0", {"url": "file:///home/me/mylib", "dir_info": {"editable": True}})
    (site / "helper.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    try:
        ip = make_shell(daemon)
        assert run(ip, f"%gpu pip install {PACKAGE}==0.8.2")[0].success  # the worker's is another version
        assert run(ip, f"import json, helper, mylib\nimport {PACKAGE}")[0].success
        assert run(ip, f"%%gpu any\nimport {PACKAGE}")[0].success  # the running worker imports 0.8.2
        result, cap = run(ip, "%gpu pip sync")
        assert result.success, (cap.stdout, result.error_in_exec)
        out = cap.stdout
        assert "installing on the daemon's host, for the worker's Python 3." in out, out
        assert f"Successfully installed {PACKAGE}-{VERSION}" in out
        assert f"installed: {PACKAGE} {VERSION} (the worker had 0.8.2)" in out
        assert f"the running worker imported {PACKAGE} before: it keeps the old version until `%gpu release`" in out
        assert "left: json: the standard library" in out
        assert "left: helper: not from an installed package (a module beside the notebook" in out
        assert "left: mylib 0.1.0 (an editable install of /home/me/mylib): not from a package index" in out
        assert "left: jupyter-gpu" not in out  # the notebook never imported it: nothing to say
        assert run(ip, "%gpu release")[0].success
        code = f"%%gpu any\nimport importlib.metadata, {PACKAGE}\nprint(importlib.metadata.version({PACKAGE!r}))"
        result, cap = run(ip, code)  # a new worker: the notebook's version
        assert result.success and cap.stdout == f"{VERSION}\n", (cap.stdout, result.error_in_exec)
        result, cap = run(ip, "%gpu pip sync")  # the same now: pip does not run
        assert result.success, (cap.stdout, result.error_in_exec)
        assert f"the same on the worker already: {PACKAGE} {VERSION}" in cap.stdout
        assert "nothing to install: the worker has the notebook's version of every package it imported" in cap.stdout
        assert "Successfully installed" not in cap.stdout
    finally:
        for name in (PACKAGE, "mylib", "helper"):
            sys.modules.pop(name, None)
        imports._CACHE.clear()
        imports._distributions.cache_clear()


def test_pip_sync_installs_what_the_index_has_and_names_what_it_lacks(
    daemon_factory, make_shell, tmp_path, monkeypatch
):
    from jupyter_gpu import imports

    site = tmp_path / "notebook-site"
    site.mkdir()
    _notebook_dist(site, PACKAGE, VERSION)
    _notebook_dist(site, "jgpu_no_such_dist", "1.0.0")  # on no index
    monkeypatch.syspath_prepend(str(site))
    try:
        ip = make_shell(daemon_factory())
        assert run(ip, f"import {PACKAGE}, jgpu_no_such_dist")[0].success
        result, cap = run(ip, "%gpu pip sync")
        assert not result.success
        assert str(result.error_in_exec).startswith("pip could not install jgpu_no_such_dist==1.0.0 (see its output")
        assert f"installed: {PACKAGE} {VERSION} (the worker had none)" in cap.stdout, cap.stdout
        code = f"%%gpu any\nimport importlib.metadata\nprint(importlib.metadata.version({PACKAGE!r}))"
        result, cap = run(ip, code)
        assert result.success and cap.stdout == f"{VERSION}\n", (cap.stdout, result.error_in_exec)
    finally:
        for name in (PACKAGE, "jgpu_no_such_dist"):
            sys.modules.pop(name, None)
        imports._CACHE.clear()
        imports._distributions.cache_clear()
