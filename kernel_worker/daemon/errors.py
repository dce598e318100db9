"""Why the daemon refuses something; every message says what and what to do."""


class StartRefused(Exception):
    """The daemon will not start as configured (an address reachable without CurveZMQ,
    several users on the process backend, a directory it cannot trust)."""


class UnsafePath(StartRefused):
    """A directory or path the daemon will not use: made by someone else, readable by
    others, a symlink, or a client's name that leads outside its root."""


class Refused(Exception):
    """A session start refused for a reason the client is told as it is."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code, self.text = code, text
