"""The notebook's GPU choice (``jupyter_gpu`` metadata, as the Lab sidebar writes it) and
the live status line, in a real shell and in headless nbconvert runs."""

from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from support.shells import run

from jupyter_gpu import notebook

KERNEL_TIMEOUT = 120
SLOW_CELL = "import time\ntime.sleep(1.5)\nprint('slept')"


def costs(cap) -> list[str]:
    return [o.data["text/plain"] for o in cap.outputs if "⏱" in o.data.get("text/plain", "")]


@pytest.fixture
def choice_daemon(daemon_factory):
    return daemon_factory("--simulate-gpus=H100:1,A100-80GB:1", "--WorkerDaemon.progress_interval=0.3")


@pytest.fixture
def sidebar_choice():
    yield
    notebook.use(None)


def write_notebook(path, cells: list[str], choice: dict | None) -> None:
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    if choice is not None:
        nb.metadata["jupyter_gpu"] = choice
    nbformat.write(nb, path)


def test_a_cell_without_a_gpu_uses_the_notebooks_choice(
    choice_daemon, make_shell, tmp_path, monkeypatch, sidebar_choice
):
    nb = tmp_path / "train.ipynb"
    write_notebook(nb, [], {"gpu": "A100-80GB"})
    monkeypatch.setenv("JPY_SESSION_NAME", str(nb))  # as Jupyter Server tells its kernels
    ip = make_shell(choice_daemon)
    result, cap = run(ip, "%%gpu\nprint('on the choice')")
    assert result.success and costs(cap)[0].startswith("⏱ A100-80GB ×1")

    # The sidebar pushes an unsaved choice straight into the kernel, with this very code.
    ip.run_cell(
        '__import__("jupyter_gpu.notebook").notebook.use(__import__("json").loads('
        + json.dumps(json.dumps({"gpu": "H100"}))
        + "))",
        silent=True,
    )
    result, cap = run(ip, "%%gpu\nprint('moved')")
    assert result.success and costs(cap)[0].startswith("⏱ H100 ×1")
    result, cap = run(ip, "%%gpu cpu\nprint('the cell wins')")
    assert result.success and costs(cap)[0].startswith("⏱ cpu")

    notebook.use(None)  # back to the file, which a person edited badly
    write_notebook(nb, [], {"gpu": 3})
    result, cap = run(ip, "%%gpu\nprint('never')")
    assert not result.success and "never" not in cap.stdout
    assert "jupyter_gpu.gpu in " + str(nb) + ' must be a string such as "H100", not 3' in str(result.error_in_exec)


def test_a_long_cell_shows_a_live_status_line_that_ends_as_its_final_state(choice_daemon, make_shell, monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    ip = make_shell(choice_daemon)
    result, cap = run(ip, "%%gpu H100\n" + SLOW_CELL)
    assert result.success
    status = [o for o in cap.outputs if "jupyter-gpu-status" in o.data.get("text/html", "")]
    assert status, "no status line for a 1.5 s cell"
    first, last = status[0].data["text/plain"], status[-1].data["text/plain"]
    assert first.startswith("running: H100 ×1 (simulated)") and "so far" in first and "util 100%" in first
    assert last.startswith("finished: H100 ×1 (simulated) · 1.") and "so far" not in last
    quick, cap = run(ip, "%%gpu H100\nx = 1")
    assert not [o for o in cap.outputs if "jupyter-gpu-status" in o.data.get("text/html", "")]


def test_headless_nbconvert_uses_the_notebooks_choice_and_records_the_status(choice_daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", choice_daemon.connection_file)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    src = tmp_path / "report.ipynb"
    write_notebook(src, ["%load_ext jupyter_gpu", "%%gpu\n" + SLOW_CELL], {"gpu": "A100-80GB"})
    out = tmp_path / "out" / "report.ipynb"
    out.parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(src), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=KERNEL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    cell = nbformat.read(out, 4).cells[1]
    texts = [o.get("data", {}).get("text/plain", "") for o in cell.outputs if o.output_type == "display_data"]
    assert any(t.startswith("⏱ A100-80GB ×1 (simulated)") for t in texts), texts
    assert any(t.startswith("finished: A100-80GB ×1 (simulated)") for t in texts), texts  # the final status, kept
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell.outputs)

    # The spend is recorded under that notebook's file.
    spend = choice_daemon.client().call("spend", {"since": 0})
    assert [n["notebook"] for n in spend["notebooks"]] == [str(src)]

    # Two notebooks holding the same cell with different choices: an error, not a guess.
    write_notebook(tmp_path / "copy.ipynb", ["%load_ext jupyter_gpu", "%%gpu\n" + SLOW_CELL], {"gpu": "H100"})
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(src), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=KERNEL_TIMEOUT,
    )
    assert proc.returncode != 0 and "name it in the cell (%%gpu H100)" in proc.stderr
