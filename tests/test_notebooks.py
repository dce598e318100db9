"""Whole notebooks through a real kernel: nbclient, `jupyter nbconvert --execute`, and a
kernel interrupted mid-cell through jupyter_client."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from support.paths import ROOT

KERNEL_TIMEOUT = 120


def execute(cells: list[str], tmp: Path, allow_errors: bool = False) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    NotebookClient(
        nb,
        timeout=KERNEL_TIMEOUT,
        kernel_name="python3",
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(tmp)}},
    ).execute()
    return nb


def outputs(cell) -> list[tuple[str, str]]:
    """(kind, payload) per output: stream name + text, or the richest mime type's data."""
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append((o.name, o.text))
        elif o.output_type in ("display_data", "execute_result"):
            kind = next((m for m in ("image/png", "text/html") if m in o.data), "text/plain")
            out.append((f"{o.output_type}:{kind}", o.data[kind]))
        elif o.output_type == "error":
            out.append(("error", o.ename + ": " + o.evalue))
    return out


def cost_lines(*cells) -> list[str]:
    return [o.data["text/plain"] for c in cells for o in c.outputs if o.get("metadata", {}).get("jupyter_gpu")]


@pytest.fixture
def via_daemon(daemon, monkeypatch):
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", daemon.connection_file)
    return daemon


def test_output_arrives_in_order_as_the_notebooks_own(via_daemon, tmp_path):
    nb = execute(
        [
            "%load_ext jupyter_gpu",
            "%%gpu any\n"
            "import sys\n"
            "from IPython.display import display, HTML, clear_output\n"
            "print('first')\n"
            "display(HTML('<b>bold</b>'))\n"
            "print('progress 1', end='\\r'); print('progress 2')\n"
            "print('oops', file=sys.stderr)\n"
            "h = display('one', display_id=True)\n"
            "h.update('two')\n"
            "print('last')\n"
            "6 * 7",
        ],
        tmp_path,
    )
    got = [(k, v) for k, v in outputs(nb.cells[1]) if "jupyter-gpu" not in v]
    kinds = [k for k, _ in got]
    assert kinds.index("display_data:text/html") > kinds.index("stdout")
    text = "".join(v for k, v in got if k == "stdout")
    assert text.startswith("first\n") and "progress 1\rprogress 2\n" in text and text.endswith("last\n")
    assert ("stderr", "oops\n") in got
    assert ("display_data:text/html", "<b>bold</b>") in got
    assert ("display_data:text/plain", "'two'") in got  # updated in place
    assert ("display_data:text/plain", "'one'") not in got
    assert got[-1] == ("execute_result:text/plain", "42")
    cost = cost_lines(nb.cells[1])
    assert len(cost) == 1 and cost[0].startswith("⏱ H100 ×1")


def test_rich_output_matplotlib_png_and_pandas_html(via_daemon, tmp_path):
    nb = execute(
        [
            "%load_ext jupyter_gpu",
            "%%gpu any\n"
            "import pandas as pd, matplotlib.pyplot as plt\n"
            "display(pd.DataFrame({'x': [1, 2]}))\n"
            "plt.plot([1, 2, 3])\n"
            "plt.show()\n",
            "%%gpu any\nfrom IPython.display import clear_output\n"
            "print('gone')\nclear_output(wait=True)\nprint('kept')",
        ],
        tmp_path,
    )
    got = outputs(nb.cells[1])
    html = [v for k, v in got if k == "display_data:text/html" and "<table" in v]
    assert html and "dataframe" in html[0]
    png = [v for k, v in got if k == "display_data:image/png"]
    assert png and len(png[0]) > 1000
    texts = [v for k, v in outputs(nb.cells[2]) if k == "stdout"]
    assert texts == ["kept\n"]


def test_ipython_syntax_runs_on_the_worker(via_daemon, tmp_path):
    nb = execute(
        ["%load_ext jupyter_gpu", "%%gpu any\n!echo from-a-shell\n%timeit -n1 -r1 sum(range(10))\nfiles = !echo a b"],
        tmp_path,
    )
    text = "".join(v for k, v in outputs(nb.cells[1]) if k == "stdout")
    assert "from-a-shell" in text and "per loop" in text


def test_quickstart_runs_headless_with_nbconvert(via_daemon, tmp_path):
    out = tmp_path / "out.ipynb"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            str(ROOT / "examples" / "quickstart.ipynb"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=KERNEL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    nb = nbformat.read(out, 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    all_out = [o for c in code for o in outputs(c)]
    costs = cost_lines(*code)
    assert len(costs) == 3 and all(c.startswith("⏱ H100 ×1 (simulated)") for c in costs)
    assert any(k == "execute_result:text/plain" and v.startswith("np.float64(") for k, v in all_out)
    assert any(k == "stderr" and "100/100" in v for k, v in all_out)  # tqdm, in place
    assert any(k == "stdout" and "b is local now: ndarray (1000,)" in v for k, v in all_out)
    assert any(k == "display_data:image/png" for k, v in all_out)


def ok(kc, code: str) -> None:
    """Run ``code`` in a real kernel; it must succeed."""
    reply = kc.execute_interactive(code, timeout=KERNEL_TIMEOUT)
    assert reply["content"]["status"] == "ok", (code, reply["content"])


def test_interrupting_the_kernel_stops_the_remote_cell(via_daemon):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        ok(kc, "%load_ext jupyter_gpu")
        ok(kc, "%%gpu any\nwarm = 'still here'")
        # stop_on_error=False: the kernel must not abort the next request after this one's error.
        msg_id = kc.execute(
            "%%gpu any\nimport time\nprint('sleeping', flush=True)\ntime.sleep(600)", stop_on_error=False
        )
        while True:  # wait for the remote cell to be running
            m = kc.get_iopub_msg(timeout=KERNEL_TIMEOUT)
            if (
                m["parent_header"].get("msg_id") == msg_id
                and m["msg_type"] == "stream"
                and "sleeping" in m["content"]["text"]
            ):
                break
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=KERNEL_TIMEOUT)
        elapsed = time.monotonic() - t0
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        # The interrupt, not the cell's end: it would sleep 600 s. The bound allows a loaded
        # machine; the exact outcome is the KeyboardInterrupt above and the warm session below.
        assert elapsed < 60, f"remote cell stopped {elapsed:.2f} s after the interrupt"
        outs: list[str] = []
        reply = kc.execute_interactive(
            "%%gpu any\nprint(warm)",
            timeout=KERNEL_TIMEOUT,
            output_hook=lambda m: outs.append(m["content"]["text"]) if m["msg_type"] == "stream" else None,
        )
        assert reply["content"]["status"] == "ok" and outs == ["still here\n"]  # the session stayed warm
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_embedded_daemon_starts_is_shared_and_exits_when_quiet(runtime_dir, tmp_path, monkeypatch):
    from jupyter_client.manager import start_new_kernel

    monkeypatch.delenv("JUPYTER_GPU_CONNECTION_FILE", raising=False)
    quiet = "%config GPUMagics.embedded_exit_when_idle = 8"
    cf = runtime_dir / "jupyter-gpu-daemon.json"
    km, kc = start_new_kernel(kernel_name="python3")  # the first notebook, which starts the daemon
    pidfd = None
    try:
        ok(kc, "%load_ext jupyter_gpu")
        ok(kc, quiet)
        lines: list[str] = []
        reply = kc.execute_interactive(
            "%%gpu any\nimport os\nprint('worker', os.getpid())",
            timeout=KERNEL_TIMEOUT,
            output_hook=lambda m: lines.append(m["content"].get("data", {}).get("text/plain", "")),
        )
        assert reply["content"]["status"] == "ok"
        [line] = [t for t in lines if t.startswith("⏱ ")]  # one line
        assert line.startswith("⏱ cpu · ") and " · cold start " in line
        pid = json.loads(cf.read_text())["pid"]
        pidfd = os.pidfd_open(pid)
        # A second kernel, while the first still holds its session (so the daemon has no
        # quiet time to race), finds the same daemon and does not start another.
        second = execute(["%load_ext jupyter_gpu", quiet, "%%gpu cpu\nprint('second ran')"], tmp_path)
        assert json.loads(cf.read_text())["pid"] == pid
        assert ("stdout", "second ran\n") in outputs(second.cells[2])
    finally:
        kc.stop_channels()
        km.shutdown_kernel()  # politely: the kernel releases its session on the way out
    try:
        # Both kernels released their sessions on exit; after 8 quiet seconds it leaves by itself.
        assert select.select([pidfd], [], [], 60)[0], "the embedded daemon did not exit when quiet"
    finally:
        if not select.select([pidfd], [], [], 0)[0]:
            os.kill(pid, 15)
        os.close(pidfd)
    assert not cf.exists()  # it cleaned up after itself
