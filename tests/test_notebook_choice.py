"""The notebook's GPU choice (``jupyter_gpu`` metadata, as the Lab sidebar writes it) and
the live status line, in a real shell and in headless nbconvert runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from support.shells import run

from jupyter_gpu import notebook
from jupyter_gpu.status_line import StatusLine

KERNEL_TIMEOUT = 120
PROGRESS_S = 2.0  # the daemon's progress interval: a cell shorter than this shows no status line


def slow_cell(flag) -> str:  # noqa: ANN001
    """A cell that runs until the notebook has shown its status line (``flag`` appears),
    however long that takes: an event, not a guess at a duration."""
    return (
        "import os, time\n"
        "deadline = time.monotonic() + 60\n"
        f"while not os.path.exists({str(flag)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        f"print('slept', os.path.exists({str(flag)!r}))"
    )


def flag_on_status_line(flag) -> str:  # noqa: ANN001
    """Kernel code: the first time a status line is shown, create ``flag``."""
    return (
        "import jupyter_gpu.status_line as _sl\n"
        "_shown = _sl.StatusLine.update\n"
        "def _update(self, progress):\n"
        "    _shown(self, progress)\n"
        f"    open({str(flag)!r}, 'a').close()\n"
        "_sl.StatusLine.update = _update\n"
    )


def final_line(text: str, device: str, cost: dict) -> None:
    """``text`` is the one line a cell that ran on ``device`` and cost ``cost`` ends with:
    its status line, become its cost line."""
    m = re.match(rf"⏱ {re.escape(device)} ×1 \(simulated\) · (\d+\.\d\d) s · (\$\d+\.\d{{4}}) · ", text)
    assert m, text
    assert m[1] == f"{cost['wall_s']:.2f}" and m[2] == f"${cost['usd']:.4f}"


def costs(cap) -> list[str]:
    return [o.data["text/plain"] for o in cap.outputs if "⏱" in o.data.get("text/plain", "")]


@pytest.fixture
def choice_daemon(daemon_factory):
    return daemon_factory("--simulate-gpus=H100:1,A100-80GB:1", f"--WorkerDaemon.progress_interval={PROGRESS_S}")


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
    pushed = ip.run_cell(
        '__import__("jupyter_gpu.notebook").notebook.use(__import__("json").loads('
        + json.dumps(json.dumps({"gpu": "H100"}))
        + "))",
        silent=True,
    )
    assert pushed.success
    result, cap = run(ip, "%%gpu\nprint('moved')")
    assert result.success and costs(cap)[0].startswith("⏱ H100 ×1")
    result, cap = run(ip, "%%gpu cpu\nprint('the cell wins')")
    assert result.success and costs(cap)[0].startswith("⏱ cpu")

    notebook.use(None)  # back to the file, which a person edited badly
    write_notebook(nb, [], {"gpu": 3})
    result, cap = run(ip, "%%gpu\nprint('never')")
    assert not result.success and "never" not in cap.stdout
    assert "jupyter_gpu.gpu in " + str(nb) + ' must be a string such as "H100", not 3' in str(result.error_in_exec)


def test_a_long_cell_shows_a_live_status_line_that_ends_as_its_final_state(
    choice_daemon, make_shell, monkeypatch, tmp_path
):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    flag = tmp_path / "status-line-shown"
    shown = StatusLine.update

    def update(self, progress: dict) -> None:
        shown(self, progress)
        flag.touch()  # the worker's cell may end now

    monkeypatch.setattr(StatusLine, "update", update)
    ip = make_shell(choice_daemon)
    result, cap = run(ip, "%%gpu H100\n" + slow_cell(flag))
    assert result.success and cap.stdout == "slept True\n"
    status = [o for o in cap.outputs if "jupyter-gpu-status" in o.data.get("text/html", "")]
    first = status[0].data["text/plain"]
    line = r"running: H100 ×1 \(simulated\) · \d+\.\d\d s · \$\d+\.\d{4} so far · no reading"
    assert re.fullmatch(line, first), first
    [last] = [o for o in cap.outputs if "jupyter_gpu" in (o.metadata or {})]
    cost = last.metadata["jupyter_gpu"]["cost"]
    assert cost["wall_s"] >= PROGRESS_S  # the line came with the first progress message
    final_line(last.data["text/plain"], "H100", cost)
    # One line: shown once, then updated in place, ending as the cost line.
    assert not status[0].update and all(o.update for o in status[1:]) and last.update

    quick, cap = run(ip, "%%gpu H100\nx = 1")  # done long before the first progress message
    assert quick.success
    assert not [o for o in cap.outputs if "jupyter-gpu-status" in o.data.get("text/html", "")]


def test_headless_nbconvert_uses_the_notebooks_choice_and_records_the_status(choice_daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", choice_daemon.connection_file)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    src = tmp_path / "report.ipynb"
    flag = tmp_path / "status-line-shown"
    cell = "%%gpu\n" + slow_cell(flag)
    write_notebook(src, ["%load_ext jupyter_gpu", flag_on_status_line(flag), cell], {"gpu": "A100-80GB"})
    out = tmp_path / "out" / "report.ipynb"
    out.parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(src), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=KERNEL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    ran = nbformat.read(out, 4).cells[2]
    assert [o.text for o in ran.outputs if o.output_type == "stream"] == ["slept True\n"]
    shown = [o for o in ran.outputs if o.output_type == "display_data"]
    texts = [o.data["text/plain"] for o in shown]
    assert len(texts) == 1, texts  # the cell's own output and one line of the extension's
    final_line(texts[0], "A100-80GB", shown[0].metadata["jupyter_gpu"]["cost"])  # the status line, become the cost
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in ran.outputs)

    # The spend is recorded under that notebook's file.
    spend = choice_daemon.client().call("spend", {"since": 0})
    assert [n["notebook"] for n in spend["notebooks"]] == [str(src)]

    # Two notebooks holding the same cell with different choices: an error, not a guess.
    write_notebook(tmp_path / "copy.ipynb", ["%load_ext jupyter_gpu", cell], {"gpu": "H100"})
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(src), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=KERNEL_TIMEOUT,
    )
    assert proc.returncode != 0 and "name it in the cell (%%gpu H100)" in proc.stderr
