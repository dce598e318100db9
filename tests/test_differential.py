"""The differential test, a bounded subset: notebooks that nbclient ships in its release
(tests/files of its sdist), run headless twice as they are and once with every code cell
under `%%gpu any` on a process-backend daemon; every cell steady between the two local runs
must show the same under %%gpu. `make differential` runs the whole corpus on both backends
(bench/differential.py; tests/differential/corpus.txt)."""

from __future__ import annotations

import differential as D
import nbformat
import pytest

# Clear Output: a cell ending with clear_output(wait=True) keeps its output, as locally (the
# cost line used to set the pending clear off and wipe it). Output: what an ipywidgets
# Output widget captures (`with out:`, its clear_output, an error in its block) stays out of
# the cell, as a frontend keeps it in the widget. update-display-id: messages a cell sends
# itself through get_ipython().kernel.session to kernel.iopub_socket, and display updates by
# id across cells.
SUBSET = (
    "Inline Image.ipynb",
    "Factorials.ipynb",
    "SVG.ipynb",
    "Clear Output.ipynb",
    "Output.ipynb",
    "update-display-id.ipynb",
)
# Steady cells that differ, each with why (README: the differential test).
KNOWN: dict[tuple[str, int], str] = {}  # (notebook, cell) -> why it differs: none today


@pytest.fixture(scope="module")
def nbclient_release():
    sources, excludes = D.read_corpus()
    [src] = [s for s in sources if s.requirement.startswith("nbclient==")]
    entries, _ = D.collect([src], excludes)
    return {e.path.name: e for e in entries}


def _check(entry: D.Entry, daemon) -> D.Result:
    local = D.run_local(entry)
    return D.compare(entry, local, D.run_gpu(entry, daemon.connection_file), "%%gpu (process)")


@pytest.fixture
def process_daemon(daemon_factory):
    return daemon_factory("--simulate-gpus=H100:1", "--WorkerDaemon.worker_heartbeat_interval=0.5")


@pytest.mark.parametrize("name", SUBSET)
def test_every_steady_cell_shows_the_same_under_gpu(name, nbclient_release, process_daemon):
    res = _check(nbclient_release[name], process_daemon)
    assert res.steady > 0 and res.wrapped > 0, D.report(res)
    known = {cell for (nb, cell) in KNOWN if nb == name}
    assert {m.cell for m in res.mismatches} == known, D.report(res)
    assert res.matching == res.steady - len(known), D.report(res)


# What a kernel gives a cell beyond its shell: the environment ipykernel sets (what `!cmd`
# sees), get_ipython().kernel and the request a cell answers, messages sent by hand.
KERNEL_CELLS = (
    'import os\nprint({k: os.environ.get(k) for k in ("TERM", "CLICOLOR", "FORCE_COLOR", "PAGER", "GIT_PAGER")})',
    "!echo $TERM $CLICOLOR_FORCE $PAGER",
    'k = get_ipython().kernel\ninfo = k.language_info\nprint(info["name"], info["file_extension"], info["mimetype"])',
    "ip = get_ipython()\n"
    'print(ip.get_parent()["header"]["msg_type"], ip.parent_header["header"]["msg_id"] == '
    'k.get_parent()["header"]["msg_id"])',
    '_ = k.send_response(k.iopub_socket, "stream", {"name": "stderr", "text": "sent by hand\\n"})',
    'display("gone")\n_ = k.session.send(k.iopub_socket, "clear_output", {"wait": False}, parent=ip.parent_header)',
    '_ = k.session.send(k.iopub_socket, "display_data", {"data": {"text/plain": "shown"}, "metadata": {}, '
    '"transient": {"display_id": "d1"}}, parent=ip.parent_header)',
    '_ = k.session.send(k.iopub_socket, "update_display_data", {"data": {"text/plain": "updated"}, "metadata": {}, '
    '"transient": {"display_id": "d1"}}, parent=ip.parent_header)',
)


def test_a_cell_gets_what_a_kernel_gives_it(tmp_path, process_daemon):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in KERNEL_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    (tmp_path / "nb").mkdir()  # a directory of its own: the daemon's socket is in tmp_path
    nbformat.write(nb, tmp_path / "nb" / "kernel.ipynb")
    res = _check(D.Entry("here", tmp_path, tmp_path / "nb" / "kernel.ipynb"), process_daemon)
    assert res.steady == len(KERNEL_CELLS), D.report(res)
    assert res.matching == res.steady, D.report(res)
