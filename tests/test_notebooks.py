"""Whole notebooks through a real kernel: nbclient, `jupyter nbconvert --execute`, and a
kernel interrupted mid-cell through jupyter_client."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook
from support.orphans import forget_daemon
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


@pytest.fixture(params=["demo", "docker"])
def quickstart_env(request, runtime_dir, daemon_factory) -> Iterator[dict[str, str]]:
    """The environment examples/quickstart.ipynb runs in. ``demo``: as `make demo` runs it,
    on the embedded daemon, configured by examples/demo/jupyter_gpu_config.py (a simulated
    H100 at $2.99 an hour), stopped by its pid afterwards. ``docker``: a daemon with the same
    simulated H100 (at its default price) on the docker backend."""
    env = dict(os.environ)
    if request.param == "docker":
        from support.daemons import docker_args

        d = daemon_factory("--simulate-gpus=H100:1", *docker_args(request.getfixturevalue("engine")))
        env["JUPYTER_GPU_CONNECTION_FILE"] = d.connection_file
        yield env
        return
    env.pop("JUPYTER_GPU_CONNECTION_FILE", None)
    env["JUPYTER_CONFIG_DIR"] = str(ROOT / "examples" / "demo")
    yield env
    cf = runtime_dir / "jupyter-gpu-daemon.json"
    if cf.exists():
        pidfd = os.pidfd_open(json.loads(cf.read_text())["pid"])
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            assert select.select([pidfd], [], [], 30)[0], "the demo's embedded daemon did not stop"
        finally:
            os.close(pidfd)
    forget_daemon(str(cf))


def test_quickstart_tells_the_money_story_headless(quickstart_env, tmp_path):
    """What a newcomer sees in `make demo`: cost lines in dollars on a simulated H100, the
    estimate on a cell's second run (in its live status line, which examples/run_headless.py
    keeps: the cost line replaces it), a cell stopped by its --budget without stopping the
    run, and the quickstart's own outputs."""
    out = tmp_path / "out.ipynb"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_headless.py"), str(ROOT / "examples" / "quickstart.ipynb"), out],
        check=False,
        capture_output=True,
        text=True,
        timeout=KERNEL_TIMEOUT * 2,
        env=quickstart_env,
    )
    assert proc.returncode == 0, proc.stderr
    nb = nbformat.read(out, 4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    gpu = [c for c in code if c.source.startswith("%%gpu")]
    assert len(gpu) == 7
    costs = cost_lines(*gpu)
    assert len(costs) == len(gpu)
    for line in costs:  # in dollars, never "(no price set)"; labelled simulated
        assert re.match(
            r"⏱ H100 ×1 \(simulated\) · \d+\.\d\d s · \$\d\.\d{4}( of \$0\.01)? · no reading · session \$", line
        )
    assert " · cold start " in costs[0]

    # The same cell twice: the second run's status line says, from its start, what the first took.
    first, second = (c for c in gpu if "epoch" in c.source)
    assert first.source == second.source
    live = [c.metadata.get("jupyter_gpu_demo", {}).get("live", []) for c in (first, second)]
    assert live[0] and not any("last run" in t for t in live[0])
    wall, usd = re.search(r" · (\d+\.\d\d s) · (\$\d\.\d{4}) · ", cost_lines(first)[0]).groups()
    assert live[1] and all(t.startswith("running: H100 ×1 (simulated) · ") for t in live[1])
    assert all(t.endswith(f" · last run: {wall}, {usd}") for t in live[1]), (live[1], wall, usd)
    assert "".join(v for k, v in outputs(second) if k == "stdout").endswith("epoch 3: loss 0.333\n")

    # The cell with a budget: stopped by the daemon once its cent was spent, as an interrupt.
    [stopped] = [c for c in gpu if "--budget" in c.source]
    assert "raises-exception" in stopped.metadata.tags
    assert ("error", "KeyboardInterrupt: ") in outputs(stopped)
    [line] = cost_lines(stopped)
    assert " of $0.01 · no reading · " in line
    assert line.endswith(
        " · stopped: this cell's budget is spent: $0.0100 of $0.01; the cell was interrupted. "
        "Give the cell a higher --budget (or raise c.GPUMagics.default_budget)"
    ), line
    [meta] = [o.metadata["jupyter_gpu"]["cost"] for o in stopped.outputs if o.get("metadata", {}).get("jupyter_gpu")]
    assert 0.01 <= meta["usd"] < 0.015  # about 12 s at $2.99 an hour; the interrupt's own time billed too
    # The run went on, and the worker lives on.
    assert ("stdout", "still warm: b has 1000 values\n") in outputs(gpu[-1])

    all_out = [o for c in code for o in outputs(c)]
    assert any(k == "execute_result:text/plain" and v.startswith("np.float64(") for k, v in all_out)
    assert any(k == "stderr" and "100/100" in v for k, v in all_out)  # tqdm, in place
    assert any(k == "stdout" and "b is local now: ndarray (1000,)" in v for k, v in all_out)
    assert any(k == "display_data:image/png" for k, v in all_out)
    report = "".join(v for k, v in outputs(code[-1]) if k == "stdout")
    assert "cells: 7, $0.0" in report and "session total (warm idle included): $0.0" in report


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
