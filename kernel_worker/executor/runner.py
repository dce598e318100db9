"""Running a cell's code in the persistent namespace: through IPython's InteractiveShell
when the image has it (magics, ``!cmd``, display, inline matplotlib), else plain exec."""

from __future__ import annotations

import ast
import os
import traceback
from typing import Any

from kernel_worker import protocol as P
from kernel_worker.executor.kernel import WorkerKernel
from kernel_worker.executor.outbox import Outbox
from kernel_worker.executor.widgets import OutputCapture

_OWN_CODE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # the executor's frames, kept out of a traceback

# The environment ipykernel's ZMQInteractiveShell.init_environment gives a kernel.
KERNEL_ENV = {
    "TERM": "xterm-color",
    "CLICOLOR": "1",
    "FORCE_COLOR": "1",
    "CLICOLOR_FORCE": "1",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
}


class Runner:
    """Runs code in the persistent namespace, reporting output through the outbox."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.shell = None
        self.exit_requested = False
        try:
            self.shell = make_shell(outbox, self.ns)
        except ImportError:
            pass

    def assigned(self, code: str) -> set[str]:
        """Names ``code`` binds anywhere (a superset of what it rebinds globally)."""
        if not code.strip():
            return set()
        try:
            tree = ast.parse(code)
        except SyntaxError:  # IPython syntax (%magic, !cmd): transform it first
            try:
                tree = ast.parse(self.shell.transform_cell(code) if self.shell is not None else code)
            except SyntaxError:
                return set()
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Global):
                names.update(node.names)
        return names

    def run(self, code: str) -> bool:
        """Run ``code``; True when it raised nothing. ``exit_requested`` says whether it
        called ``exit()`` or raised SystemExit (the worker then ends, as a kernel would)."""
        self.exit_requested = False
        if self.shell is not None:
            self.shell.exit_now = False
            result = self.shell.run_cell(code, store_history=True)
            self.exit_requested = bool(self.shell.exit_now) or isinstance(result.error_in_exec, SystemExit)
            return result.success
        try:
            tree = ast.parse(code, "<cell>")
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<cell>", "exec"), self.ns)
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), self.ns)
                if value is not None:
                    self.ns["_"] = value
                    self.outbox.send(
                        self.outbox.parent.reply(P.Msg.RESULT, {"data": {"text/plain": repr(value)}, "metadata": {}})
                    )
            return True
        except BaseException as e:  # the user's exception, KeyboardInterrupt included
            self.exit_requested = isinstance(e, SystemExit)
            # The cell's frames only: neither this runner's nor the executor's signal handler's.
            frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_OWN_CODE)]
            tb = ["Traceback (most recent call last):", *traceback.format_list(frames)]
            tb = [entry.rstrip("\n") for entry in tb + traceback.format_exception_only(type(e), e)]  # joined by "\n"
            self.outbox.send(
                self.outbox.parent.reply(P.Msg.ERROR, {"ename": type(e).__name__, "evalue": str(e), "traceback": tb})
            )
            return False


def make_shell(outbox: Outbox, ns: dict) -> Any:
    """An InteractiveShell whose displays, results and tracebacks go to the outbox."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type

    def reply(kind: str, content: dict) -> None:
        outbox.send(outbox.parent.reply(kind, content))

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            kind = P.Msg.UPDATE_DISPLAY if update else P.Msg.DISPLAY
            reply(kind, {"data": data, "metadata": metadata or {}, "transient": transient or {}})

        def clear_output(self, wait=False):
            reply(P.Msg.CLEAR, {"wait": bool(wait)})

    class Hook(DisplayHook):
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            reply(P.Msg.RESULT, {"data": format_dict, "metadata": md_dict or {}})

    class WorkerShell(InteractiveShell):
        display_pub_class = Type(Publisher)
        displayhook_class = Type(Hook)

        # As ipykernel's ZMQInteractiveShell: the request being answered (ipywidgets' Output
        # reads it to capture the cell's output; code passes it as a message's parent).
        def get_parent(self):
            return self.kernel.get_parent()

        def set_parent(self, parent, channel="shell"):
            pass  # every output of the running cell answers its request already

        @property
        def parent_header(self):
            return self.get_parent()

        def init_environment(self):
            # As ipykernel's shell: what a cell's subprocesses see in a kernel (`!ls` in
            # colour and columns aligned with spaces, no pager waiting for a key).
            os.environ.update(KERNEL_ENV)

        def _showtraceback(self, etype, evalue, stb):
            reply(
                P.Msg.ERROR, {"ename": getattr(etype, "__name__", str(etype)), "evalue": str(evalue), "traceback": stb}
            )

        def enable_gui(self, gui=None):
            pass

        def ask_exit(self):  # exit() / quit(): the executor ends the worker after this cell
            self.exit_now = True

    from traitlets.config import Config

    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # History lives in memory: the SQLite history thread would cost every cell a commit.
    config = Config({"HistoryManager": {"hist_file": ":memory:"}})
    shell = WorkerShell.instance(user_ns=ns, colors="Linux", config=config)
    shell.kernel = WorkerKernel(shell, outbox, reply)
    OutputCapture(outbox).install()
    return shell
