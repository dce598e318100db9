"""`%gpu pip install`: a package from the machine's own index, installed on the daemon's
host into the user's package directory, importable by the running worker and by every
later one (after a release), with pip's output shown; anything but requirement
specifiers is refused before pip runs."""

from __future__ import annotations

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
