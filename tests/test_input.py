"""input() and getpass() in a remote cell prompt in the notebook, as a local cell would
(Jupyter's input_request); a headless run gets Jupyter's usual error."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from support.kernels import KERNEL_TIMEOUT, kernel


def test_input_and_getpass_in_a_remote_cell_ask_the_notebook_s_user(daemon):
    with kernel(daemon.connection_file) as (km, kc):
        asked: list[tuple[str, bool]] = []
        out: list[str] = []

        def stdin_hook(m: dict) -> None:
            asked.append((m["content"]["prompt"], m["content"]["password"]))
            kc.input("bob" if not m["content"]["password"] else "s3cret")

        def output_hook(m: dict) -> None:
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout":
                out.append(m["content"]["text"])

        reply = kc.execute_interactive(
            "%%gpu any\nimport getpass\nprint('before')\nname = input('name? ')\npw = getpass.getpass()\n"
            "print('hello', name, len(pw))",
            timeout=KERNEL_TIMEOUT,
            allow_stdin=True,
            stdin_hook=stdin_hook,
            output_hook=output_hook,
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        assert asked == [("name? ", False), ("Password: ", True)]
        assert "".join(out) == "before\nhello bob 6\n"


def test_a_headless_run_gets_jupyters_usual_error_from_a_remote_input(daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_GPU_CONNECTION_FILE", daemon.connection_file)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext jupyter_gpu"),
        nbformat.v4.new_code_cell("%%gpu any\ninput('x? ')"),
    ]
    try:
        NotebookClient(nb, timeout=KERNEL_TIMEOUT, kernel_name="python3").execute()
        raise AssertionError("the cell ran without an error")
    except CellExecutionError as e:
        assert e.ename == "StdinNotImplementedError"
        assert "raw_input was called, but this frontend does not support input requests." in e.evalue


def test_an_input_reply_that_is_not_one_bounded_string_is_refused(daemon):
    from jupyter_gpu.client import DaemonError
    from kernel_worker import protocol as P

    client = daemon.client()
    for content in ({"value": 5}, {"value": "x" * (1024**2 + 1)}, {"error": ["a"]}, {}):
        try:
            client.call(P.Msg.INPUT_REPLY, content, session="s", timeout=10)
            raise AssertionError(f"{str(content)[:40]} was accepted")
        except DaemonError as e:
            assert (e.code, str(e)) == (P.Err.BAD_MESSAGE, "an input reply is one string of at most 1048576")
