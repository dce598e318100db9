"""Background cells in a real kernel: `%%gpu --background` returns at once, the notebook
runs other cells meanwhile, the job's output goes on arriving in its own cell (display
updates), `%gpu wait` and `%gpu cancel` work, a %%gpu cell waits for the job, and a
headless run (nbclient) runs it in the foreground so none of its output is lost."""

from __future__ import annotations

import json

import nbformat
from nbclient import NotebookClient
from support.files import wait_for_file
from support.kernels import KERNEL_TIMEOUT, kernel
from support.kernels import run as krun

# A Jupyter Server sets this for the kernels it starts: a frontend shows their cells.
IN_A_FRONTEND = {"JPY_SESSION_NAME": "work.ipynb"}


def _session(kc) -> str:
    return krun(kc, "print(get_ipython().magics_manager.registry['GPUMagics'].session_id)")[0].strip()


# Markers in the session's bulk directory, which host and container both see.
MARKS = "import os, time\nmarks = os.environ['JUPYTER_GPU_BULK_DIR']\n"


def test_a_background_cell_returns_at_once_and_its_output_keeps_arriving_in_its_cell(daemon, tmp_path):
    with kernel(daemon.connection_file, "%config GPUMagics.status_line = 'html'", env=IN_A_FRONTEND) as (km, kc):
        go = tmp_path / "bulk" / _session(kc) / "go"
        assert krun(kc, "a = 41")[1] == "ok"
        job_cell = kc.execute(
            f"%%gpu any --background\n{MARKS}print('first', a, flush=True)\n"
            "while not os.path.exists(os.path.join(marks, 'go')): time.sleep(0.02)\n"
            "print('second')\nmade = 'by the job'"
        )
        reply = kc.get_shell_msg(timeout=KERNEL_TIMEOUT)
        assert reply["parent_header"]["msg_id"] == job_cell and reply["content"]["status"] == "ok"
        # The cell is done; the job runs on. Another cell runs meanwhile.
        assert krun(kc, "print('local', a + 1)") == ("local 42\n", "ok")
        texts: list[str] = []
        while not any("first 41" in t for t in texts):  # the job's output, into its own cell's display
            m = kc.get_iopub_msg(timeout=KERNEL_TIMEOUT)
            if m["msg_type"] == "update_display_data":
                texts.append(m["content"]["data"].get("text/plain", ""))
        go.touch()
        out, status = krun(kc, "%gpu wait 1")
        assert status == "ok" and out.startswith("first 41\nsecond\njob 1: any done, "), out
        out, status = krun(kc, "%%gpu any\nprint(made)")  # the job's variables are on the worker
        assert (out, status) == ("by the job\n", "ok")


def test_a_gpu_cell_waits_for_the_background_job_and_cancel_interrupts_one(daemon, tmp_path):
    with kernel(daemon.connection_file, "%config GPUMagics.status_line = 'html'", env=IN_A_FRONTEND) as (km, kc):
        ran = tmp_path / "bulk" / _session(kc) / "running"
        assert (
            krun(kc, "%%gpu any --background\nimport time\nfor i in range(3): print(i, flush=True)\nn = 3")[1] == "ok"
        )
        out, status = krun(kc, "%%gpu any\nprint('after the job', n)")
        assert status == "ok" and out == "after the job 3\n", out
        code = f"%%gpu any --background\n{MARKS}open(os.path.join(marks, 'running'), 'w').close()\ntime.sleep(600)"
        assert krun(kc, code)[1] == "ok"
        wait_for_file(ran)
        out, status = krun(kc, "%gpu cancel 2")
        assert status == "ok" and out.startswith("job 2: any cancelled"), out
        assert krun(kc, "%gpu jobs")[0].splitlines()[1].startswith("job 2: any cancelled")


def test_a_headless_run_waits_for_a_background_cell_so_no_output_is_lost(daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", daemon.connection_file)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext jupyter_gpu"),
        nbformat.v4.new_code_cell("%%gpu any --background\nfor i in range(3): print('line', i)"),
    ]
    NotebookClient(nb, timeout=KERNEL_TIMEOUT, kernel_name="python3").execute()
    outs = nb.cells[1].outputs
    assert "".join(o.get("text", "") for o in outs if o.output_type == "stream") == "line 0\nline 1\nline 2\n"
    notes = [json.dumps(o.get("metadata", {})) for o in outs if o.output_type == "display_data"]
    assert any("a headless run: ran in the foreground" in n for n in notes), outs


def test_input_in_a_background_cell_gets_jupyters_usual_error_instead_of_waiting(daemon):
    with kernel(daemon.connection_file, env=IN_A_FRONTEND) as (km, kc):
        code = "%%gpu any --background\nprint('asking', flush=True)\nname = input('name? ')\nprint('never')"
        assert krun(kc, code)[1] == "ok"  # returns at once, as any background cell
        reply = kc.execute_interactive("%gpu wait 1", timeout=KERNEL_TIMEOUT)["content"]
        assert reply["status"] == "error" and reply["ename"] == "StdinNotImplementedError", reply
        assert "raw_input was called, but this frontend does not support input requests" in reply["evalue"]
        assert "run the cell without --background" in reply["evalue"]
        out, status = krun(kc, "%gpu jobs")
        assert status == "ok" and out.startswith("job 1: any failed"), out
        assert krun(kc, "%%gpu any\nprint('the session serves on')") == ("the session serves on\n", "ok")
