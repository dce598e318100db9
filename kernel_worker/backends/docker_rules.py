"""The rules every client-chosen value meets before it reaches Docker: where a volume may
be mounted, how a --volume option reads, what an image reference may look like, and
which Linux capabilities exist (with what each gives a cell)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kernel_worker.backends.base import VolumeError, check_volume_name, shown

PKG_TARGET = "/opt/jupyter-gpu/kernel_worker"
SOCKET_TARGET = "/run/jupyter-gpu"
BULK_TARGET = "/run/jupyter-gpu-bulk"
USER_PACKAGES_TARGET = "/opt/jupyter-gpu-packages"  # the user's `%gpu pip install` directory, read-only
# A volume may not go on, above or under these: the worker's own mounts, the files Docker
# mounts itself, and the kernel's file systems (added to the operator's extra_mounts).
EXECUTOR_MOUNTS = (PKG_TARGET, SOCKET_TARGET, BULK_TARGET, USER_PACKAGES_TARGET)
DOCKER_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")
KERNEL_PATHS = ("/proc", "/sys", "/dev")
NO_NEW_PRIVILEGES = "no-new-privileges"
_PATH_PART_RE = re.compile(r"[A-Za-z0-9_.@+-]{1,128}")
MOUNT_PATH_RULE = (
    "an absolute path such as /data or /mnt/data: parts of letters, digits, '_', '.', '-', '@', '+', "
    "no '.' or '..' parts, at most 200 characters"
)
# An image reference as Docker's reference grammar has it ([host[:port]/]path[:tag][@digest]):
# no '..', no leading '/', nothing that could walk the Engine API's URLs.
IMAGE_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
UID_GID_RE = re.compile(r"([0-9]{1,10}):([0-9]{1,10})")
# What adding each capability back gives a cell (shown in the cap_add help); any other
# Linux capability name is accepted too.
CAPABILITY_GIVES = {
    "SYS_PTRACE": "trace and read the memory of the container's other processes (py-spy, gdb)",
    "SYS_NICE": "raise priorities, pin CPUs and NUMA memory (some data loaders ask for it)",
    "IPC_LOCK": "lock memory beyond the memlock limit (RDMA / InfiniBand NCCL)",
    "NET_BIND_SERVICE": "listen on ports below 1024",
    "NET_RAW": "raw sockets: ping, and forging packets on the container's network",
    "CHOWN": "change the owner of any file it can reach, volumes included",
    "DAC_OVERRIDE": "read and write any file it can reach whatever its mode, volumes and extra_mounts included",
    "FOWNER": "change the mode of any file it can reach",
    "SETUID": "become any uid (setuid binaries stay inert under no-new-privileges)",
    "SETGID": "become any gid",
    "SYS_ADMIN": "mounts, namespaces and much of what root can do: never on a shared box",
}
LINUX_CAPABILITIES = {
    *CAPABILITY_GIVES,
    *"""AUDIT_CONTROL AUDIT_READ AUDIT_WRITE BLOCK_SUSPEND BPF CHECKPOINT_RESTORE DAC_READ_SEARCH FSETID
    KILL LEASE LINUX_IMMUTABLE MAC_ADMIN MAC_OVERRIDE MKNOD NET_ADMIN NET_BROADCAST PERFMON SETFCAP
    SETPCAP SYSLOG SYS_BOOT SYS_CHROOT SYS_MODULE SYS_PACCT SYS_RAWIO SYS_RESOURCE SYS_TIME
    SYS_TTY_CONFIG WAKE_ALARM IPC_OWNER""".split(),
}


def _overlaps(a: str, b: str) -> bool:
    """Whether mounting at ``a`` lands on, above or under ``b``."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check_mount_path(name: str, path: str, reserved: Iterable[str]) -> str:
    """``path`` (normalised) if volume ``name`` may be mounted there. The path is
    client-chosen: it must not shadow the executor's package, socket or bulk directory,
    the operator's mounts (``reserved``) or the kernel's file systems."""

    def refused(why: str) -> VolumeError:
        return VolumeError(f"cannot mount volume {name!r} at {shown(path)}: {why}; use {MOUNT_PATH_RULE}")

    if not path.startswith("/"):
        raise refused("it is not an absolute path")
    norm = path[:-1] if len(path) > 1 and path.endswith("/") else path
    if norm == "/":
        raise refused("that is the container's root")
    if len(norm) > 200:
        raise refused("it is too long")
    for part in norm.split("/")[1:]:
        if part in (".", ".."):
            raise refused("'.' and '..' are not allowed in it")
        if not _PATH_PART_RE.fullmatch(part):
            raise refused("it has an empty part or a character outside the allowed ones")
    for other in (*EXECUTOR_MOUNTS, *reserved, *DOCKER_FILES):
        if _overlaps(norm, other):
            raise refused(f"it is on, above or under {other}, which the worker needs")
    for kernel in KERNEL_PATHS:
        if norm == kernel or norm.startswith(kernel + "/"):
            raise refused(f"{kernel} is the kernel's")
    return norm


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    path: str
    read_only: bool

    @classmethod
    def parse(cls, text: object, reserved: Iterable[str] = ()) -> "VolumeSpec":
        """``NAME:/path`` or ``NAME:/path:ro`` (or ``:rw``), as a client sent it: the name
        checked by the one volume-name rule, the path by ``check_mount_path``."""
        parts = text.strip().split(":") if isinstance(text, str) else []
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise VolumeError(f"cannot read --volume {shown(text)}: write NAME:/path or NAME:/path:ro")
        name = check_volume_name(parts[0], "mount")
        return cls(name, check_mount_path(name, parts[1], reserved), parts[2:] == ["ro"])
