"""CurveZMQ identities for tests: a daemon key pair and users authorised by name, made
with the real `jupyter gpu keys` commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import zmq.auth

from kernel_worker import keys


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jupyter_gpu.cli", *args], capture_output=True, text=True, timeout=60)


def curve_users(
    tmp: Path, authorised: tuple[str, ...], strangers: tuple[str, ...] = ()
) -> tuple[Path, bytes, dict[str, tuple[bytes, bytes]]]:
    """(keys dir, server public key, {name: (public, secret)}): ``authorised`` users are in
    authorized_keys as themselves, ``strangers`` have keys nobody authorised."""
    kd = tmp / "keys"
    server_pub = cli("keys", "init", "--keys-dir", str(kd)).stdout.strip()
    users = {}
    for name in (*authorised, *strangers):
        zmq.auth.create_certificates(str(tmp), name)
        public, secret = keys.load(str(tmp), name)
        users[name] = (public, secret)
        if name in authorised:
            out = cli("keys", "authorize", f"--key={public.decode()}", "--user", name, "--keys-dir", str(kd))
            assert out.returncode == 0, out.stderr
    return kd, server_pub.encode(), users
