"""A directory's plain files across a socket, for a worker that cannot see the daemon's
disk (a Slurm node without a shared filesystem): a snapshot written on the node goes into
the daemon's store, and one restored comes from it.

The sender sends FILE messages, each one piece of one file, in order (``of``: the request
they belong to, ``name``, ``offset``, ``size``: the whole file's), then the message that
names the files (``files``: name -> size) and so closes the stream. Pieces are views of
the files mapped into memory: nothing is copied before ZeroMQ sends it. The receiver
checks each piece as hostile input (a plain name it may write, in order, within the file's
size and the total it may take) before writing it at its offset into a fresh file of its
own directory; the closing message is accepted only when every file it names arrived whole
and nothing else did. Standard library only, but for the protocol: the executor uses this.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from typing import Any

from kernel_worker import protocol as P

PIECE_BYTES = 4 * 1024 * 1024  # like a value's chunks: each hop forwards one while the next arrives
MOST_FILES = 100_000
NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")  # a snapshot's file names: no "/", no leading "."
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO cannot hang us
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class FileStreamError(Exception):
    """A piece or a closing message that does not fit the stream; says which and why."""


def pieces(directory: str, of: str, session: str) -> tuple[list[P.Message], dict[str, int]]:
    """The FILE messages carrying ``directory``'s plain files, and name -> size of each.
    Symlinks and anything but plain files are not sent."""
    out: list[P.Message] = []
    files: dict[str, int] = {}
    for name in sorted(os.listdir(directory)):
        if not NAME_RE.match(name):
            continue
        try:
            fd = os.open(os.path.join(directory, name), _READ)
        except OSError:
            continue  # a symlink, or gone
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            size = files[name] = st.st_size
            data: Any = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ)) if size else b""
        finally:
            os.close(fd)  # the mapping outlives it
        for offset in range(0, max(size, 1), PIECE_BYTES):
            content = {"of": of, "name": name, "offset": offset, "size": size}
            piece = [data[offset : offset + PIECE_BYTES]]
            out.append(P.Message(P.Msg.FILE, content, session, parent=of, buffers=piece))
    return out, files


class Receiver:
    """Writes one stream's pieces into ``directory`` (which the caller made, private and
    empty), at most ``most_bytes`` in all, never a name in ``refused``."""

    def __init__(self, directory: str, of: str, most_bytes: int, refused: frozenset[str] = frozenset()):
        self.directory, self.of, self.most_bytes, self.refused = directory, of, most_bytes, refused
        self.files: dict[str, list[int]] = {}  # name -> [fd, size, bytes written]
        self.total = 0

    def add(self, msg: P.Message) -> None:
        c = msg.content
        name, offset, size = c.get("name"), c.get("offset"), c.get("size")
        if c.get("of") != self.of:
            raise FileStreamError(f"a file piece for another stream ({str(c.get('of'))[:40]!r})")
        if not isinstance(name, str) or not NAME_RE.match(name) or name in self.refused:
            raise FileStreamError(f"a file piece names {str(name)[:80]!r}, which is not a file it may write")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, size)):
            raise FileStreamError(f"{name}: a piece's offset and size are whole numbers")
        if len(msg.buffers) != 1:
            raise FileStreamError(f"{name}: a piece carries exactly one frame")
        data = memoryview(msg.buffers[0].buffer if hasattr(msg.buffers[0], "buffer") else msg.buffers[0]).cast("B")
        entry = self.files.get(name) or self._open(name, size)
        fd, expected, written = entry
        if size != expected or offset != written or offset + data.nbytes > size:
            raise FileStreamError(f"{name}: a piece of {data.nbytes} bytes at {offset} does not follow what came")
        while data:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
        entry[2] = offset

    def _open(self, name: str, size: int) -> list[int]:
        if len(self.files) >= MOST_FILES:
            raise FileStreamError(f"more than {MOST_FILES} files")
        self.total += size
        if self.total > self.most_bytes:
            raise FileStreamError(f"more than the {self.most_bytes} bytes it may take")
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = os.open(name, _CREATE, 0o600, dir_fd=dfd)
        except FileExistsError:
            raise FileStreamError(f"{name} came twice") from None
        finally:
            os.close(dfd)
        entry = self.files[name] = [fd, size, 0]
        return entry

    def finish(self, named: Any, sync: bool = True) -> None:
        """The stream's closing message names ``named`` (name -> size): every one of them
        whole, nothing else; each file synced to disk (``sync``) and closed."""
        try:
            if not isinstance(named, dict):
                raise FileStreamError("the stream's end names no files")
            got = {name: (size, written) for name, (_, size, written) in self.files.items()}
            for name, size in named.items():
                if got.get(name) != (size, size):
                    have = got.get(name, (0, 0))[1]
                    raise FileStreamError(f"{str(name)[:80]} arrived with {have} of its {size} bytes")
            if got.keys() - named.keys():
                raise FileStreamError(f"{sorted(got.keys() - named.keys())[0]} came but was not named")
            if sync:
                for fd, _, _ in self.files.values():
                    os.fsync(fd)
        finally:
            self.close()

    def close(self) -> None:
        for entry in self.files.values():
            if entry[0] >= 0:
                os.close(entry[0])
                entry[0] = -1
