"""The notebook's side of the workspace sync: what of the notebook's directory travels to a
worker that does not share its host.

``scan`` walks the directory and returns a ``Manifest`` (relpath -> size, content hash
(xxh3-128: it only tells the notebook's own versions of a file apart), mode);
``plan`` compares it with what the workspace already has (``Workspaces.have`` on the
daemon) and names the files to send; ``contents`` reads them; the daemon's
``Workspaces.apply`` writes them. Only changed content travels, and an unchanged tree costs
one ``lstat`` per file: a stat cache ((size, mtime_ns, ctime_ns, inode) -> hash) keeps
hashes between scans. ctime is in the key because a tool that restores mtimes (``cp -p``,
``tar``, ``rsync -t``) cannot restore it. The stats also let a daemon on the same host copy
a file itself (``WorkdirWire``), only while it is still the file that was hashed.

A hash is not cached while the file's mtime is within ``RACY_NS`` of the scan (git's
"racy clean" problem: a write in the same timestamp tick would leave the stat
unchanged); such a file is hashed again next time, and only recently written files pay.

Excluded: the built-in ``WorkdirSync.excludes``, then each directory's ``.gitignore`` and
``.jupyter-gpu-ignore`` (``*``, ``?``, ``[...]``, ``**``, leading or middle ``/``
anchors, trailing ``/`` for directories only, ``!`` re-includes; last match wins, deeper
files after shallower ones; nothing inside an excluded directory can be re-included, as in
git). Left out, and said so in ``message``: symbolic links (never followed: a link could
lead anywhere, and the workspace refuses links so that a cell cannot aim the sync outside
it), special files, unreadable files, names the workspace cannot hold, and files past the
limits (``max_file_bytes``, ``max_files``, ``max_total_bytes``, in walk order).

What the scan reads to hash a file (up to ``KEEP_BYTES`` in all) stays in the Manifest for
``contents``: a file that had to be hashed has changed, so it is about to be sent, and
reading it once instead of twice is much of the cost of a first sync. ``scan(keep=False)``
(a daemon on this host, which copies the files itself) reads into one reused buffer per
thread instead: no memory is allocated, nor faulted in, for the bytes.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import operator
import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import xxhash
from traitlets import Int, List, Unicode
from traitlets.config import Configurable

from jupyter_gpu.workdir_rules import Rules, _matcher  # noqa: F401 -- Rules re-exported
from kernel_worker.workspace_tree import BadPath, Data, check_relpath, human, write_files

RACY_NS = 2_000_000_000  # mtime granularity to distrust (FAT: 2 s; ext4, xfs, tmpfs: a clock tick)
KEEP_BYTES = 256 * 1024**2  # contents read while hashing kept for the send that follows
IGNORE_FILES = (".gitignore", ".jupyter-gpu-ignore")
DEFAULT_EXCLUDES = (  # tools' own directories and files, never wanted on a worker
    ".git .hg .svn __pycache__ .ipynb_checkpoints node_modules .venv .tox .mypy_cache .pytest_cache .ruff_cache "
    "*.pyc *.pyo *.swp .DS_Store"
).split()
_CHUNK = 1024 * 1024
_BUFFERS = threading.local()  # one read buffer per hashing thread (scan(keep=False))
_NAME = operator.attrgetter("name")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO swapped in must not block
Entry = tuple  # (size, content hash hex, mode)
content_hash = xxhash.xxh3_128_hexdigest  # bytes-like -> 32 hex digits
StatKey = tuple  # (size, mtime_ns, ctime_ns, ino)


def notebook_key(path: str) -> str:
    """The workspace key for a notebook: a hash of this host and the notebook's absolute
    path, so two notebooks (or two hosts' same path) never share a workspace."""
    return hashlib.sha256(f"{socket.gethostname()}\0{os.path.abspath(path)}".encode()).hexdigest()[:32]


@dataclass
class Manifest:
    """One scan of a directory. ``entries`` (relpath -> (size, hash, mode)) is what the
    daemon's ``Workspaces.apply`` takes; ``left_out`` (relpath, why) what ``message`` tells."""

    root: str
    entries: dict[str, Entry] = field(default_factory=dict)
    root_id: tuple = ()  # (st_dev, st_ino) of root as scanned: a daemon copying from it checks it
    left_out: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, StatKey] = field(default_factory=dict, repr=False)
    hashed: int = 0  # files this scan hashed; the rest came from the stat cache
    kept: dict[str, bytes] = field(default_factory=dict, repr=False)  # read while hashing, for the send

    @property
    def total_bytes(self) -> int:
        return sum(e[0] for e in self.entries.values())


def _skey(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _read_all(fd: int, size: int) -> bytes:
    """The whole file behind ``fd``, expected to be ``size`` bytes (less if it shrank, no
    more if it grew: the stat taken after tells). ``os.read`` allocates without zeroing."""
    data = os.read(fd, size)
    if len(data) < size:  # a short read (Linux reads at most 2 GiB at once) or a file that shrank
        parts = [data]
        while size > (got := sum(map(len, parts))) and (more := os.read(fd, size - got)):
            parts.append(more)
        data = b"".join(parts)
    return data


def _hash_file(path: str, keep: bool) -> tuple[str, bytes | None, StatKey, StatKey]:
    """(content hash, the contents if ``keep``, stat before, stat after) of the file at
    ``path``, opened without following a symlink. Module-level so a test can count calls."""
    fd = os.open(path, _FILE_FLAGS)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file")
        data = None
        if keep:
            data = _read_all(fd, before.st_size)
            sha = content_hash(data)
        else:
            view = getattr(_BUFFERS, "view", None)
            if view is None:
                view = _BUFFERS.view = memoryview(bytearray(_CHUNK))
            h = xxhash.xxh3_128()
            while k := os.readv(fd, [view]):
                h.update(view[:k])
            sha = h.hexdigest()
        return sha, data, _skey(before), _skey(os.fstat(fd))
    finally:
        os.close(fd)


class WorkdirSync(Configurable):
    """Scans the notebook's directory for the workspace sync; keeps the stat cache between
    scans, so keep one instance per kernel."""

    max_total_bytes = Int(
        2 * 1000**3,
        help="Most bytes of the notebook's directory synced to a remote worker; files past it are left out.",
    ).tag(config=True)
    max_files = Int(20_000, help="Most files of the notebook's directory synced to a remote worker.").tag(config=True)
    max_file_bytes = Int(
        500 * 1000**2, help="Largest single file synced to a remote worker; larger ones are left out (use a volume)."
    ).tag(config=True)
    excludes = List(
        Unicode(),
        DEFAULT_EXCLUDES,
        help="Patterns (.gitignore syntax) never synced. The directory's own .gitignore and .jupyter-gpu-ignore "
        "apply after them, so a '!pattern' there re-includes.",
    ).tag(config=True)

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self._cache: dict[str, dict[str, tuple[StatKey, Entry]]] = {}  # root -> relpath -> (stat key, entry)
        self._default_rules: Rules | None = None
        self._matchers: dict[tuple[Rules, ...], Callable[[str, str, bool], bool]] = {}
        self._rules: dict[tuple[str, StatKey], Rules] = {}  # parsed ignore files, by path and stat

    def _ignore_file(self, path: str, base: str, st: os.stat_result) -> Rules | None:
        key = (path, _skey(st))
        rules = self._rules.get(key)
        if rules is None:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    rules = Rules(f.read(1024 * 1024).splitlines(), base)
            except OSError:
                return None
            self._rules[key] = rules
        return rules

    def scan(self, root: str, keep: bool = True) -> Manifest:
        """What of ``root`` would be synced, and what is left out and why (OSError if ``root``
        itself cannot be read: an empty manifest would empty the workspace). Walks directory by
        directory (a directory's files by name, then its subdirectories), which is also the
        order in which the limits leave files out. Hashes only files whose stat changed
        since the last scan (in threads when there is much to hash), keeping what it read
        for ``contents`` if ``keep``."""
        root = os.path.abspath(root)
        fd = os.open(root, _DIR_FLAGS)  # no directory, no sync: raise rather than empty the workspace
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        started = time.time_ns()
        m = Manifest(root, root_id=(st.st_dev, st.st_ino))
        entries, stats, left_out = m.entries, m.stats, m.left_out
        most_bytes, most_files, most_total = self.max_file_bytes, self.max_files, self.max_total_bytes
        count = total = 0
        old = self._cache.get(root, {})
        cache: dict[str, tuple[StatKey, Entry]] = {}
        misses: list[tuple[str, os.stat_result]] = []
        stack = [(root, "", (self._defaults(),))]
        while stack:
            path, rel, layers = stack.pop()
            try:  # by descriptor: entries are stat'ed relative to it, and a link swapped in is refused
                dfd = os.open(path, _DIR_FLAGS)
            except OSError as e:
                left_out.append((rel.rstrip("/") or ".", f"directory cannot be read: {e.strerror}"))
                continue
            try:
                with os.scandir(dfd) as it:
                    ents = sorted(it, key=_NAME)
                layers, excluded = self._layers(path, rel, layers, ents)
                subdirs = []
                for e in ents:
                    name = e.name
                    r = rel + name
                    if e.is_dir(follow_symlinks=False):
                        if not excluded(r, name, True):
                            subdirs.append((f"{path}/{name}", r + "/", layers))
                        continue
                    if excluded(r, name, False):
                        continue
                    if not e.is_file(follow_symlinks=False):
                        why = "a symbolic link: links are not followed (copy the target in, or use a volume)"
                        left_out.append((r, why if e.is_symlink() else "not a regular file"))
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    size = st.st_size
                    hit = old.get(r)
                    if hit is None:
                        try:
                            check_relpath(r)
                        except BadPath as err:
                            left_out.append((r, str(err).split(": ", 1)[-1]))
                            continue
                    if size > most_bytes:
                        left_out.append((r, f"{human(size)}, over WorkdirSync.max_file_bytes = {human(most_bytes)}"))
                    elif count >= most_files:
                        left_out.append((r, f"past WorkdirSync.max_files = {most_files}"))
                    elif total + size > most_total:
                        left_out.append((r, f"would pass WorkdirSync.max_total_bytes = {human(most_total)}"))
                    else:
                        count += 1
                        total += size
                        key = stats[r] = (size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                        if hit is not None and hit[0] == key:
                            entries[r] = hit[1]
                            cache[r] = hit
                        else:
                            entries[r] = None  # keeps the walk's order; filled in by _hash
                            misses.append((r, st))
                stack.extend(reversed(subdirs))
            finally:
                os.close(dfd)
        self._hash(root, misses, m, cache, started, KEEP_BYTES if keep else 0)
        self._cache[root] = cache  # only what this scan saw: removed files leave the cache
        return m

    def _defaults(self) -> Rules:
        if self._default_rules is None or self._default_rules.lines != tuple(self.excludes):
            self._default_rules = Rules(self.excludes)
            self._matchers.clear()
        return self._default_rules

    def _layers(self, path: str, rel: str, layers: tuple, ents: list) -> tuple[tuple, Callable]:
        """The ignore files in force in one directory (its own after its parents'), and
        their matcher (cached: the same files give the same matcher on the next scan)."""
        for name in IGNORE_FILES:
            i = bisect.bisect_left(ents, name, key=_NAME)  # ents are sorted by name
            e = ents[i] if i < len(ents) and ents[i].name == name else None
            if e is not None and e.is_file(follow_symlinks=False):
                rules = self._ignore_file(f"{path}/{name}", rel.rstrip("/"), e.stat(follow_symlinks=False))
                layers = layers + (rules,) if rules is not None else layers
        excluded = self._matchers.get(layers)
        if excluded is None:
            if len(self._matchers) > 1000:
                self._matchers.clear()
            excluded = self._matchers[layers] = _matcher(layers)
        return layers, excluded

    def _hash(self, root: str, misses: list, m: Manifest, cache: dict, started: int, budget: int) -> None:
        jobs = []
        for rel, st in misses:  # keep contents for the send that follows, in path order, up to KEEP_BYTES
            keep = 0 < budget and st.st_size <= budget
            budget -= st.st_size if keep else 0
            jobs.append((rel, st, keep))

        def one(job: tuple[str, os.stat_result, bool]) -> tuple:
            rel, st, keep = job
            try:
                return rel, st, _hash_file(os.path.join(root, rel), keep)
            except FileNotFoundError:
                return rel, st, None
            except OSError as e:
                return rel, st, e

        if len(jobs) > 1 and sum(st.st_size for _, st in misses) > 8 * _CHUNK:  # reads release the GIL
            n = min(8, os.cpu_count() or 1)
            batches = [jobs[i : i + 16] for i in range(0, len(jobs), 16)]  # few futures, not one a file
            with ThreadPoolExecutor(n) as pool:
                results = [r for batch in pool.map(lambda b: [one(j) for j in b], batches) for r in batch]
        else:
            results = [one(j) for j in jobs]
        for rel, st, res in results:
            m.stats.pop(rel, None)
            if res is None:
                del m.entries[rel]
                continue
            if isinstance(res, OSError):
                del m.entries[rel]
                m.left_out.append((rel, f"cannot be read: {res.strerror or type(res).__name__}"))
                continue
            sha, data, before, after = res
            m.hashed += 1
            size = len(data) if data is not None else after[0]
            m.entries[rel] = (size, sha, stat.S_IMODE(st.st_mode))
            m.stats[rel] = after if before == after else ()  # changed while read: contents() reads it again
            if data is not None and before == after:
                m.kept[rel] = data
            if before == after and after[1] < started - RACY_NS:
                cache[rel] = (after, m.entries[rel])

    def plan(self, manifest: Manifest, remote_have: Mapping[str, str]) -> list[str]:
        """The relpaths whose content the workspace lacks (``remote_have``: relpath ->
        content hash, from ``Workspaces.have``), in the manifest's order. Files the manifest no
        longer lists are not named: ``Workspaces.apply`` removes them."""
        return [rel for rel, e in manifest.entries.items() if remote_have.get(rel) != e[1]]

    def contents(self, manifest: Manifest, relpaths: Iterable[str]) -> dict[str, Data]:
        """relpath -> contents to send. Uses what the scan read while hashing when the file
        is unchanged since; a file changed since the scan is read and hashed again and its
        manifest entry updated (send ``manifest.entries`` after this), one that vanished is
        dropped from the manifest and noted in ``left_out``."""
        out: dict[str, Data] = {}
        for rel in relpaths:
            path = os.path.join(manifest.root, rel)
            data = manifest.kept.pop(rel, None)
            if data is not None:
                try:
                    if _skey(os.lstat(path)) == manifest.stats.get(rel):
                        out[rel] = data
                        continue
                except OSError:
                    pass
            try:
                fd = os.open(path, _FILE_FLAGS)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise IsADirectoryError(errno.EISDIR, "no longer a regular file")
            except OSError as e:
                manifest.entries.pop(rel, None)
                manifest.left_out.append((rel, f"changed while syncing: {e.strerror}"))
                continue
            try:
                before = _skey(os.fstat(fd))
                data = _read_all(fd, before[0])
                after = _skey(os.fstat(fd))
            finally:
                os.close(fd)
            if not (before == after == manifest.stats.get(rel)):
                sha = content_hash(data)
                mode = manifest.entries.get(rel, (0, "", 0o644))[2]
                manifest.entries[rel] = (len(data), sha, mode)
                manifest.stats[rel] = after
            out[rel] = data
        return out

    def message(self, left_out: Sequence[tuple[str, str]], most: int = 5) -> str:
        """One line naming what was left out of the worker's copy and why ('' if nothing):
        files with the same reason together, at most ``most`` names and reasons."""
        if not left_out:
            return ""
        groups: dict[str, list[str]] = {}
        for rel, why in left_out:
            groups.setdefault(why, []).append(rel)
        parts, named = [], 0
        for why, rels in list(groups.items())[:most]:
            names = ", ".join(rels[:most]) + (f" and {len(rels) - most} more" if len(rels) > most else "")
            parts.append(f"{names} ({why})")
            named += len(rels)
        rest = f"; {len(left_out) - named} more for other reasons" if named < len(left_out) else ""
        n = len(left_out)
        fix = "exclude them in .jupyter-gpu-ignore to silence this"
        if any("WorkdirSync." in why for why in groups):
            fix = "exclude them in .jupyter-gpu-ignore, or raise the limit named in your Jupyter config (c.WorkdirSync)"
        return (
            f"jupyter-gpu: {n} file{'s' if n != 1 else ''} of the notebook's directory not synced to the worker: "
            f"{'; '.join(parts)}{rest}. To sync them, {fix}."
        )

    def store(self, root: str, files: Mapping[str, Data]) -> list[str]:
        """Write fetched files (``Workspaces.read``) into ``root``, each name checked, never
        through a symlink, each atomically; permissions follow the umask."""
        return write_files(root, files, private=False)
