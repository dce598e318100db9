"""What `pip install` of the wheel gives a user: the server extension enabled, the Lab
sidebar prebuilt and enabled, and no top-level module called ``server``."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile

from support.paths import ROOT

BUILD_TIMEOUT = 300


def test_wheel_ships_the_prebuilt_sidebar_and_enables_both_extensions(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        env=env,
        timeout=BUILD_TIMEOUT,
    )
    [wheel] = tmp_path.glob("jupyter_gpu-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"jupyter_gpu", "kernel_worker", "jupyter_gpu_server"}
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    assert "etc/jupyter/jupyter_server_config.d/jupyter_gpu_server.json" in data
    lab = "share/jupyter/labextensions/jupyter-gpu/"
    assert {lab + "package.json", lab + "install.json", lab + "static/style.js"} <= set(data)
    assert any(n.startswith(lab + "static/remoteEntry.") for n in data)

    # pip-installed into an environment of its own (pip would replace this venv's editable
    # install otherwise): Jupyter finds and enables both halves from there.
    prefix = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True, timeout=BUILD_TIMEOUT)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(prefix / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        timeout=BUILD_TIMEOUT,
    )
    site = sysconfig.get_path("purelib", vars={"base": str(prefix)})
    jenv = {
        **os.environ,
        "PYTHONPATH": site,
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "JUPYTER_CONFIG_PATH": str(prefix / "etc" / "jupyter"),
    }

    def jupyter(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "jupyter", *args], capture_output=True, text=True, env=jenv, timeout=60
        )
        return done.stdout + done.stderr

    labext = jupyter("labextension", "list")
    assert f"{prefix}/share/jupyter/labextensions" in labext
    line = next(x for x in labext.splitlines() if "jupyter-gpu v" in x)
    assert "enabled" in line and "OK" in line and "X" not in line.replace("OK", ""), labext
    # What Jupyter Server reads from the installed config, and the package it then loads.
    probe = (
        "import sys, jupyter_gpu_server\n"
        "from jupyter_server.extension.config import ExtensionConfigManager\n"
        "from jupyter_server.extension.manager import ExtensionPackage\n"
        "found = ExtensionConfigManager(read_config_path=[sys.argv[1]]).get_jpserver_extensions()\n"
        "print(found, ExtensionPackage(name='jupyter_gpu_server').validate(), jupyter_gpu_server.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(prefix / "etc" / "jupyter")],
        capture_output=True,
        text=True,
        env=jenv,
        timeout=60,
    )
    assert done.stdout.startswith(f"{{'jupyter_gpu_server': True}} True {site}"), done.stdout + done.stderr
