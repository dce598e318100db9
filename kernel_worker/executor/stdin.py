"""input() and getpass() in a remote cell ask the notebook's user, as in a local cell:
the question goes to the notebook (Jupyter's input_request there), the answer comes back.
A headless notebook cannot answer: the cell gets Jupyter's usual error."""

from __future__ import annotations

import builtins
import getpass
import sys
from typing import Any

from kernel_worker import protocol as P
from kernel_worker.executor.channel import Channel

POLL_S = 0.1  # how long one wait for the answer holds the socket; output flows in between


class StdinNotImplementedError(RuntimeError):
    """What Jupyter raises where the frontend cannot answer input requests."""


def _error_class(name: str) -> type[Exception]:
    if name == "StdinNotImplementedError":
        try:  # the same class a local cell would get, when the worker has IPython
            from IPython.core.error import StdinNotImplementedError as ipython_error

            return ipython_error
        except ImportError:
            return StdinNotImplementedError
    return RuntimeError


class RemoteStdin:
    def __init__(self, channel: Channel):
        self.channel = channel
        self.request: P.Message | None = None  # the cell running now

    def install(self) -> None:
        builtins.input = self.input
        getpass.getpass = self.getpass

    def input(self, prompt: Any = "") -> str:
        return self._ask(str(prompt), password=False)

    def getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        return self._ask(str(prompt), password=True)

    def _ask(self, prompt: str, password: bool) -> str:
        if self.request is None:
            raise StdinNotImplementedError("input() outside a running cell: nobody can answer it")
        sys.stdout.flush()
        question = self.request.reply(P.Msg.INPUT_REQUEST, {"prompt": prompt, "password": password})
        with self.channel.lock:
            self.channel.flush()  # what the cell printed before asking comes first
            self.channel.send(question)
        answer = None
        while answer is None:  # Ctrl-C (the notebook's interrupt) ends the wait, as locally
            answer = self.channel.answer_to(question, POLL_S)
        error = answer.content.get("error")
        if isinstance(error, str):
            raise _error_class(error)(str(answer.content.get("message") or error))
        return str(answer.content.get("value", ""))
