"""Why the daemon refuses something; every message says what and what to do."""


class StartRefused(Exception):
    """The daemon will not start as configured (an address reachable without CurveZMQ,
    several users on the process backend, a directory it cannot trust)."""


class UnsafePath(StartRefused):
    """A directory or path the daemon will not use: made by someone else, readable by
    others, a symlink, or a client's name that leads outside its root."""
