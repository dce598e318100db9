"""Slurm's own container support (``sbatch --container=BUNDLE``) on the one-node test
cluster of tests/support/slurm.py: an OCI bundle and the ``oci.conf`` that has slurmstepd
run each batch step in it with ``runc``.

    bundle = make_bundle(tmp / "bundle", share=tmp / "share")
    with slurm_cluster(tmp, conf_files={"oci.conf": oci_conf(tmp / "runc")}) as slurm:
        job = slurm.sbatch(f"--container={bundle.path}", script="#!/bin/sh\\nexec python3 -V\\n")

The bundle is ``config.json`` plus ``rootfs/`` unpacked from the debootstrap tarball that
``make test-image`` builds (Debian's python3, pyzmq and cloudpickle), with a marker file
only it has, and the notebook's own cloudpickle put where its Python finds it first (as
in the docker backend's test image: the executor refuses a cloudpickle other than the
notebook's). The container shares the host's network (no network namespace), so the
executor's dial back to 127.0.0.1 reaches the daemon, and sees this checkout read-only at
its own path, so ``SlurmBackend.code_dir``'s PYTHONPATH works unchanged. It has its own
PID, IPC and mount namespaces, a read-only root and a tmpfs /tmp.

What Slurm 22.05 (Debian bookworm's) does with it, read from its slurmstepd
(src/slurmd/slurmstepd/container.c) and checked here: at the step's setup it copies
config.json into the spool directory (``%b``) with ``root.path`` forced to
``BUNDLE/rootfs``, the batch script bind-mounted read-only at /tmp/slurm/startup as
``process.args``, the job's output file at /tmp/slurm/stdout and stderr, and the job's
environment appended to ``process.env``; then it execs ``/bin/sh -c RunTimeRun`` as the
batch step's task. ``RunTimeRun`` starts with ``exec`` so that the task is runc itself:
``scancel --batch --signal=INT`` signals that one process, and runc passes a signal on to
the container's first process (the executor); without ``exec`` the signal would stop at
the shell. At the step's end slurmstepd asks ``RunTimeQuery`` and, for a container still
known, ``RunTimeKill`` and ``RunTimeDelete``.

runc, not crun: crun 1.8 (bookworm's) refuses this machine's hybrid cgroup layout
(cgroup v1 controllers plus a v2 hierarchy that holds a controller: "cgroups in hybrid
mode not supported, drop all controllers from cgroupv2"), whatever ``--cgroup-manager``
says. runc keeps its state under the root directory given here, so ``containers(root)``
(``runc --root=DIR list``) lists exactly this cluster's containers.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

from .slurm import CLIENT_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]  # this checkout: what SlurmBackend.code_dir defaults to
ROOTFS_TAR = ROOT / ".cache" / "rootfs-bookworm.tar"
RUNC = "/usr/sbin/runc"
MARKER = "/etc/jupyter-gpu-bundle"  # a file only the bundle's root file system has
PYTHON = "/usr/bin/python3"  # the bundle's Python: SlurmBackend.python
SHARE = "/scratch"  # where the container sees the test's shared directory, read-write
# slurmstepd fills these in: node, user, job, step, task. The batch step's id is 4294967291.
CONTAINER_ID = "%n.%u.%j.%s.%t"
BATCH_STEP = 4294967291
CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID"]


@dataclass
class Bundle:
    path: Path  # what --container names: config.json and rootfs/
    marker: str  # the text of MARKER inside
    python_version: str  # what PYTHON says platform.python_version() is
    share: Path | None  # the host directory the container sees at SHARE


def config(code_dir: Path, share: Path | None) -> dict:
    """The bundle's config.json: root in the container (Slurm's jobs here are root's), a
    read-only root file system, the host's network, this checkout read-only at its own path."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        # Slurm mounts the batch script and the job's output under /tmp/slurm: over this tmpfs
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": str(code_dir), "type": "bind", "source": str(code_dir), "options": ["rbind", "ro", "nosuid"]},
    ]
    if share is not None:
        mounts.append({"destination": SHARE, "type": "bind", "source": str(share), "options": ["rbind", "rw"]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/false"],  # Slurm puts the batch script here
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},  # Slurm 22.05 uses BUNDLE/rootfs whatever this says
        "mounts": mounts,
        "linux": {
            # no "network" namespace: the host's, so 127.0.0.1 is the login node's daemon
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def make_bundle(d: Path, code_dir: Path = ROOT, share: Path | None = None) -> Bundle:
    """An OCI bundle under ``d`` (made here; about 270 MB, unpacked in about a second)."""
    if not ROOTFS_TAR.exists():
        raise RuntimeError(f"{ROOTFS_TAR} is missing: `make test-image` builds it with debootstrap")
    d.mkdir(parents=True, exist_ok=True)
    rootfs = d / "rootfs"
    rootfs.mkdir()
    subprocess.run(["tar", "-C", str(rootfs), "-xf", str(ROOTFS_TAR)], check=True, timeout=300)
    marker = f"jupyter-gpu test bundle {secrets.token_hex(8)}"
    (rootfs / MARKER.lstrip("/")).write_text(marker + "\n")
    [pylib] = sorted((rootfs / "usr" / "lib").glob("python3.[0-9]*"))
    site = rootfs / "usr" / "local" / "lib" / pylib.name / "dist-packages"  # before Debian's on sys.path
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(os.path.dirname(cloudpickle.__file__), site / "cloudpickle")
    version = subprocess.run(
        ["chroot", str(rootfs), PYTHON, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=CLIENT_TIMEOUT,
    ).stdout.strip()
    if share is not None:
        share.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config(code_dir, share), indent=1))
    return Bundle(d, marker, version, share)


def oci_conf(state_dir: Path, runtime: str = RUNC) -> str:
    """oci.conf (beside slurm.conf) for ``runtime`` (runc's command line) keeping its state
    under ``state_dir``. ``exec`` makes the batch step's task runc itself (signals reach
    the container); whatever a step leaves is killed outright, then deleted."""
    if not os.access(runtime, os.X_OK):
        raise RuntimeError(f"{runtime} is not installed: `make system-deps` installs Debian's runc")
    rt = f"{runtime} --root={state_dir}"
    return (
        f'RunTimeQuery="{rt} state {CONTAINER_ID}"\n'
        f'RunTimeKill="{rt} kill --all {CONTAINER_ID} KILL"\n'
        f'RunTimeDelete="{rt} delete --force {CONTAINER_ID}"\n'
        f'RunTimeRun="exec {rt} run --bundle %b {CONTAINER_ID}"\n'
    )


def container_id(node: str, user: str, job_id: str) -> str:
    """The runc id of a job's batch step, as oci_conf's CONTAINER_ID makes it."""
    return f"{node}.{user}.{job_id}.{BATCH_STEP}.0"


def containers(state_dir: Path, runtime: str = RUNC) -> list[dict]:
    """What ``runc --root=state_dir list`` knows (id, pid, status, bundle, ...): running
    containers and stopped ones not yet deleted."""
    r = subprocess.run(
        [runtime, f"--root={state_dir}", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    if r.returncode != 0:
        raise AssertionError(f"runc list exited {r.returncode}: {r.stderr.strip()}")
    return json.loads(r.stdout) or []  # "null" when there are none
