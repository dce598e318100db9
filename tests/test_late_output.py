"""Output written after its cell returned (a thread, a logging handler) is not dropped: it
appears at the start of the next %%gpu cell of the session, after a note, in order."""

from __future__ import annotations

from support.files import wait_for_file
from support.shells import run

# The thread prints when told (a marker file), then waits until that output has left the
# worker (its outbox is empty) and says so (another marker).
STARTS_A_THREAD = (
    "%%gpu any\nimport os, sys, threading, time\nmarks = os.environ['JUPYTER_GPU_BULK_DIR']\n"
    "def later():\n"
    "    while not os.path.exists(os.path.join(marks, 'go')): time.sleep(0.01)\n"
    "    print('late 1'); print('late 2')\n"
    "    while sys.stdout._outbox.due_in(1.0) != 1.0: time.sleep(0.001)\n"
    "    open(os.path.join(marks, 'sent'), 'w').close()\n"
    "t = threading.Thread(target=later); t.start()\n"
    "print('cell 1')"
)


def test_output_written_after_a_cell_returned_opens_the_next_cell(daemon, make_shell, tmp_path):
    ip = make_shell(daemon)
    marks = tmp_path / "bulk" / ip.magics_manager.registry["GPUMagics"].session_id
    result, cap = run(ip, STARTS_A_THREAD)
    assert result.success and cap.stdout == "cell 1\n", (cap.stdout, result.error_in_exec)
    (marks / "go").touch()
    wait_for_file(marks / "sent")
    result, cap = run(ip, "%%gpu any\nt.join()\nprint('cell 2')")
    assert result.success, result.error_in_exec
    assert cap.stdout == "late 1\nlate 2\ncell 2\n"
    assert cap.stderr == "[jupyter-gpu] written after the previous cell returned (1 output):\n"
