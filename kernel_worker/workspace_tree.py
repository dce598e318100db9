"""The file-level rules of the workspace sync, shared by the daemon (``workspace``) and the
notebook (``jupyter_gpu.workdir``): ``check_relpath``, the one rule for a client-sent file
name; ``glob_regex``, the pattern compiler for ignore files and fetches; ``Tree``, a
directory tree opened one directory at a time by descriptor with ``O_NOFOLLOW`` (a symlink
a cell plants is refused, never followed); ``write_files``; and a walk that never follows
a link. Standard library only."""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import secrets
import stat
from typing import Callable, Mapping, Union

MAX_DEPTH = 64  # components in one relpath
MAX_NAME_BYTES = 255  # one component (NAME_MAX)
MAX_PATH_BYTES = 4096  # a whole relpath (PATH_MAX)
TREE, STATE = "tree", "state.json"
_TMP_PREFIX = ".jgpu-tmp-"
_KEY_RE = re.compile(r"[0-9a-f]{16,64}")
_SHA_RE = re.compile(r"[0-9a-f]{32}(?:[0-9a-f]{32})?")  # xxh3-128, or sha256 (older notebooks)
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
NOISE = frozenset({"__pycache__", ".ipynb_checkpoints"})  # what Python and Jupyter write by themselves
WORKSPACE, PACKAGES = "workspace", "packages"  # the trees a worker on another node keeps a copy of (MIRROR)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Data = Union[bytes, bytearray, memoryview]
Stat = tuple  # (size, mtime_ns, ctime_ns, ino)
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # copy_file_range: use sendfile


class _Changed(Exception):
    """A file being copied in changed: nothing is landed."""


class WorkspaceError(ValueError):
    """A sync or fetch that cannot be done; the message says what and what to do."""


class BadPath(WorkspaceError):
    """A relpath that is not a plain path inside the workspace, or meets a symlink there."""


class QuotaExceeded(WorkspaceError):
    """The user's workspaces would grow past Workspaces.quota_bytes."""


def shown(value: object, most: int = 60) -> str:
    """``value`` for a message: its repr, cut short, so a hostile value stays small."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:most]) + ("..." if len(text) > most else "")


def human(n: float) -> str:
    """A byte count as people read it (decimal units, as `ls -h --si` and disks do)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def check_relpath(rel: object) -> str:
    """``rel`` if it is a plain relative path (``a/b/c.txt``), else BadPath saying why. The
    one rule for a file's name, on both sides: the notebook leaves out what fails it."""
    if type(rel) is not str or not rel:
        raise BadPath(f"{shown(rel)} is not a file name")
    return _check_str(rel)


@functools.lru_cache(maxsize=1 << 16)  # a sync checks the same names in each of its requests
def _check_str(rel: str) -> str:
    parts = rel.split("/")
    try:
        sizes = [len(p.encode("utf-8")) for p in parts]
    except UnicodeEncodeError:
        sizes = []
    why = (
        "it contains a NUL byte" if "\x00" in rel
        else "it contains a control character" if _CONTROL.search(rel)
        else "it is absolute" if rel.startswith("/")
        else "it is not valid UTF-8" if not sizes
        else f"it is longer than {MAX_PATH_BYTES} bytes" if sum(sizes) + len(parts) > MAX_PATH_BYTES
        else f"it is more than {MAX_DEPTH} directories deep" if len(parts) > MAX_DEPTH
        else "it has an empty, '.' or '..' component" if any(p in ("", ".", "..") for p in parts)
        else f"a component is longer than {MAX_NAME_BYTES} bytes" if max(sizes) > MAX_NAME_BYTES
        else f"names starting {_TMP_PREFIX!r} are reserved for the sync" if _TMP_PREFIX in rel
        else ""
    )  # fmt: skip
    if why:
        raise BadPath(f"refusing file name {shown(rel)}: {why}")
    return rel


_GLOB = re.compile(
    r"\\(?P<lit>.)|(?P<dirs>(?:^|(?<=/))\*\*/)|(?P<all>(?:^|(?<=/))\*\*$)|(?P<star>\*+)|(?P<one>\?)"
    r"|\[(?P<neg>[!^])?(?P<cls>\]?[^\]]*)\]|(?P<ch>.)",
    re.S,
)


def glob_regex(pattern: str) -> str:
    """Regex source for a '/'-separated glob, gitignore-flavoured: ``*`` and ``?`` stay
    within one component, ``[...]`` is a class (``[!...]`` negated), ``**/`` is any number
    of directories, a trailing ``/**`` everything inside, ``\\x`` a literal x."""
    out = []
    for m in _GLOB.finditer(pattern):
        kind, text = m.lastgroup, m.group(m.lastgroup or "ch")
        if kind == "cls":
            body = "".join(c if c == "-" else re.escape(c) for c in text)
            out.append(f"(?!/)[{'^' if m.group('neg') else ''}{body}]")
        else:
            out.append({"dirs": "(?:.*/)?", "all": ".*", "star": "[^/]*", "one": "[^/]"}.get(kind) or re.escape(text))
    return "".join(out)


def _walk(tree: str, skip: frozenset = frozenset()) -> list[tuple[str, os.stat_result]]:
    """(relpath, lstat) of every regular file under ``tree``, at most MAX_DEPTH deep, never
    entering a directory named in ``skip``. By descriptor, ``O_NOFOLLOW`` at each level: a
    directory a cell swaps for a symlink mid-walk is skipped, never followed."""
    out: list[tuple[str, os.stat_result]] = []

    def visit(fd: int, rel: str, depth: int) -> None:
        with os.scandir(fd) as it:
            ents = list(it)
        for e in ents:
            if e.is_dir(follow_symlinks=False):
                if e.name in skip or depth >= MAX_DEPTH:
                    continue
                try:
                    sub = os.open(e.name, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                try:
                    visit(sub, f"{rel}{e.name}/", depth + 1)
                finally:
                    os.close(sub)
            elif e.is_file(follow_symlinks=False) and not e.name.startswith(_TMP_PREFIX):
                try:
                    out.append((rel + e.name, e.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    pass

    try:
        top = os.open(tree, _DIR_FLAGS)
    except OSError:
        return out
    try:
        visit(top, "", 1)
    finally:
        os.close(top)
    return out


def _perm(mode: int) -> int:
    """Owner-only permissions, keeping only whether the file is executable."""
    return 0o700 if mode & 0o111 else 0o600


def _key(st: os.stat_result) -> Stat:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class Tree:
    """One directory tree opened a directory at a time by descriptor, ``O_NOFOLLOW`` at
    every step: a name checked here cannot be redirected by a symlink swapped in later,
    and ``..`` never appears (``check_relpath``). Used for the workspace on the daemon and
    for fetched files landing in the notebook's directory."""

    def __init__(self, root: str, private: bool = True, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self.private = private  # 0700 / 0600 (workspaces); else as the umask says (the notebook's directory)
        self.owner = owner  # uid, gid given what is made here: the uid a container mounting the tree runs as
        self._fds = {"": os.open(root, _DIR_FLAGS)}
        self._tmp = f"{_TMP_PREFIX}{secrets.token_hex(8)}-"  # + a count: unguessable, one token a Tree
        self._count = itertools.count()

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def dir(self, reldir: str, create: bool = False) -> int:
        """A descriptor for directory ``reldir`` (already checked), made if ``create``."""
        fd = self._fds.get(reldir)
        if fd is not None:
            return fd
        parent, _, name = reldir.rpartition("/")
        pfd = self.dir(parent, create)
        if create:
            try:
                os.mkdir(name, 0o700 if self.private else 0o777, dir_fd=pfd)
                if self.owner is not None:
                    os.chown(name, *self.owner, dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            raise
        except OSError:  # ELOOP / ENOTDIR: a symlink or a file where a directory should be
            raise BadPath(
                f"{shown(reldir)} in {self.root} is a symbolic link or a file, not a directory: "
                "nothing is written through it (a cell may have made it; remove or rename it)"
            ) from None
        self._fds[reldir] = fd
        return fd

    def write(self, rel: str, data: Data, mode: int) -> os.stat_result:
        """Write ``data`` to ``rel`` atomically (temporary file renamed over it): 0700 if
        ``mode`` has an executable bit, else 0600 (private trees; else 0777 / 0666 less
        the umask). Returns the file's lstat."""

        def fill(fd: int) -> None:
            with memoryview(data) as mv, mv.cast("B") as view:
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])

        return self._land(rel, mode, fill)

    def copy(self, rel: str, src: int, want: Stat, mode: int) -> os.stat_result | None:
        """Write the file open at ``src`` (freshly opened: at its start) to ``rel`` as
        ``write`` does, if its stat is ``want`` (size, mtime_ns, ctime_ns, ino) before and
        after: copied in the kernel (``copy_file_range``, a reflink where the file system
        can; ``sendfile`` across file systems), never through this process's memory. None,
        with nothing written, when it is not a regular file, not ``want``, or changes."""
        before = os.fstat(src)
        if not stat.S_ISREG(before.st_mode) or _key(before) != tuple(want):
            return None
        size = want[0]

        def fill(fd: int) -> None:
            done = 0
            while done < size:
                try:
                    k = os.copy_file_range(src, fd, size - done)  # both positions advance
                except OSError as e:  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: not between these two
                    if e.errno not in _NO_CFR:
                        raise
                    k = os.sendfile(fd, src, None, size - done)
                if not k:
                    raise _Changed
                done += k
            if _key(os.fstat(src)) != tuple(want):  # written to while copied: not landed
                raise _Changed

        try:
            return self._land(rel, mode, fill)
        except _Changed:
            return None

    def _land(self, rel: str, mode: int, fill: Callable[[int], None]) -> os.stat_result:
        reldir, _, name = rel.rpartition("/")
        dfd = self.dir(reldir, create=True)
        tmp = f"{self._tmp}{next(self._count)}"
        perm = _perm(mode) if self.private else (0o777 if mode & 0o111 else 0o666)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perm, dir_fd=dfd)
        try:
            if self.owner is not None:
                os.fchown(fd, *self.owner)
            fill(fd)
            if self.private:
                os.fchmod(fd, perm)
            os.close(fd)
            fd = -1
            try:
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except IsADirectoryError:
                raise BadPath(f"{shown(rel)} is a directory in {self.root}; remove it to sync the file") from None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)

    def read(self, rel: str, most: int) -> bytes:
        """The contents of regular file ``rel``: at most ``most`` + 1 bytes (so a caller
        can tell that it is larger than ``most``)."""
        fd = self._open(rel)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadPath(f"{shown(rel)} is not a regular file")
            return f.read(most + 1)

    def _open(self, rel: str) -> int:
        reldir, _, name = rel.rpartition("/")
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # a FIFO, a tty: harmless
            return os.open(name, flags, dir_fd=self.dir(reldir))
        except FileNotFoundError:
            raise
        except OSError:
            raise BadPath(f"{shown(rel)} in {self.root} is a symbolic link or cannot be opened") from None

    def chmod(self, rel: str, mode: int) -> os.stat_result:
        """Give file ``rel`` the permissions ``write`` would; returns its new stat."""
        fd = self._open(rel)
        try:
            os.fchmod(fd, _perm(mode))
            return os.fstat(fd)
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result:
        reldir, _, name = rel.rpartition("/")
        return os.stat(name, dir_fd=self.dir(reldir), follow_symlinks=False)

    def unlink(self, rel: str) -> None:
        """Remove file ``rel``, then its directories as they become empty."""
        reldir, _, name = rel.rpartition("/")
        os.unlink(name, dir_fd=self.dir(reldir))
        while reldir:
            parent, _, name = reldir.rpartition("/")
            try:
                os.rmdir(name, dir_fd=self.dir(parent))
            except OSError:
                return
            os.close(self._fds.pop(reldir))
            reldir = parent


def write_files(
    root: str, files: Mapping[str, Data], modes: Mapping[str, int] | None = None, private: bool = True
) -> list[str]:
    """Write ``files`` (relpath -> bytes) under ``root``, each relpath checked, never through
    a symlink, atomically. Returns the relpaths written."""
    for rel in files:
        check_relpath(rel)
    with Tree(root, private) as t:
        for rel, data in files.items():
            t.write(rel, data, (modes or {}).get(rel, 0o644))
    return sorted(files)
