"""CurveZMQ keys, for a daemon that other machines reach over tcp.

The operator makes the server key pair once (``jupyter gpu keys init``) and authorises
each user's public key under a user name (``jupyter gpu keys authorize KEY --user NAME``)
in ``authorized_keys``, a text file of ``<z85 public key> <user>`` lines that the daemon
re-reads when it changes, without a restart. The user name a key maps to is the identity
the daemon gives every request on that connection; nothing a client sends can change it.
"""

from __future__ import annotations

import os
import re

import zmq
import zmq.auth
from jupyter_core.paths import jupyter_config_dir

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized_keys"
_USER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY_RE = re.compile(r"^[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}$")


def default_dir() -> str:
    return os.path.join(jupyter_config_dir(), "jupyter_gpu")


def init(keys_dir: str, name: str = SERVER) -> str:
    """Make the ``name`` key pair if there is none; return its public key (z85)."""
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    secret = os.path.join(keys_dir, f"{name}.key_secret")
    if not os.path.exists(secret):
        zmq.auth.create_certificates(keys_dir, name)
        os.chmod(secret, 0o600)
    return load(keys_dir, name)[0].decode()


def load(keys_dir: str, name: str = SERVER) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys; a clear error when they were never made."""
    path = os.path.join(keys_dir, f"{name}.key_secret")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {name} key in {keys_dir}: run `jupyter gpu keys init` first")
    public, secret = zmq.auth.load_certificate(path)
    return public, secret


def _check(public: str, user: str | None = None) -> None:
    if not _KEY_RE.match(public):
        raise ValueError(f"{public!r} is not a z85 CurveZMQ public key (40 characters)")
    if user is not None and not _USER_RE.match(user):
        raise ValueError(f"bad user name {user!r}: letters, digits, '_', '.', '-'")


def authorize(keys_dir: str, public: str, user: str) -> None:
    _check(public, user)
    entries = {k: u for k, u in read(keys_dir).items() if k != public}
    entries[public] = user
    _write(keys_dir, entries)


def revoke(keys_dir: str, public: str) -> bool:
    entries = read(keys_dir)
    if entries.pop(public, None) is None:
        return False
    _write(keys_dir, entries)
    return True


def read(keys_dir: str) -> dict[str, str]:
    """public key -> user, from ``authorized_keys`` (comments and junk lines ignored)."""
    out = {}
    try:
        with open(os.path.join(keys_dir, AUTHORIZED)) as f:
            for line in f:
                if line.lstrip().startswith("#"):
                    continue  # z85 keys may contain '#': only whole lines are comments
                parts = line.split()
                if len(parts) == 2 and _KEY_RE.match(parts[0]) and _USER_RE.match(parts[1]):
                    out[parts[0]] = parts[1]
    except FileNotFoundError:
        pass
    return out


def _write(keys_dir: str, entries: dict[str, str]) -> None:
    os.makedirs(keys_dir, mode=0o700, exist_ok=True)
    path = os.path.join(keys_dir, AUTHORIZED)
    with open(path + ".tmp", "w") as f:
        f.write("# <z85 public key> <user>: who may use this jupyter-gpu daemon\n")
        f.writelines(f"{k} {u}\n" for k, u in sorted(entries.items(), key=lambda e: e[1]))
    os.replace(path + ".tmp", path)


class Authorized:
    """The authorised keys, re-read whenever the file changes."""

    def __init__(self, keys_dir: str):
        self.path = os.path.join(keys_dir, AUTHORIZED)
        self.keys_dir = keys_dir
        self._stamp: tuple | None = None
        self._entries: dict[str, str] = {}

    def user(self, public: str) -> str | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._entries = read(self.keys_dir)
            self._stamp = stamp
        return self._entries.get(public)
