"""`%gpu pip sync`: on the worker, the notebook's exact version of every installed package
the notebook has imported so far (the "package sync" idea, cell-sized).

The notebook's side: the modules named by an import in any cell run so far (``In``, the
``%%gpu`` cells' bodies included), each mapped to the distribution that provides it here
and its version, plus what those distributions need (as installed here). The worker says
which versions it has (a one-line probe run there, binding no names); those that differ
or are missing are pinned (``DIST==VERSION``, ``--no-deps``: every dependency is pinned
itself, so pip never brings another version of one) and installed by ``%gpu pip install``
on the daemon's host, where the network is.

Left, and said so: the standard library, modules of no installed distribution (a module
beside the notebook), distributions installed from a directory, URL or VCS (an editable
install has no version an index could give), and what the executor itself runs on.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from jupyter_gpu.imports import _STDLIB, _importable, requirement

MARK = "[jupyter-gpu pip sync] "  # starts the probe's one line of output
# The executor's own footing: the worker keeps its version (another could break it).
OWN = frozenset({"pyzmq", "cloudpickle", "ipython", "jupyter-gpu"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTRA = re.compile(r";.*\bextra\s*==")
PROBE = """
import importlib.metadata as m, json, platform, sys
have = {}
for d in WANTED:
    try:
        have[d] = m.version(d)
    except m.PackageNotFoundError:
        have[d] = None
loaded = [n for n in MODULES if n in sys.modules]
print(MARK + json.dumps({"python": platform.python_version(), "have": have, "loaded": loaded}))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cell_imports(cells: Iterable[str], transform: Callable[[str], str] | None = None) -> list[str]:
    """Top-level modules named by an ``import`` anywhere in ``cells``, in order; a cell
    magic's body (``%%gpu``, ``%%time``) counts as Python."""
    found: list[str] = []
    for cell in cells:
        if not isinstance(cell, str) or "import" not in cell:
            continue
        body = cell.lstrip()
        if body.startswith("%%"):
            body = body.partition("\n")[2]
        try:
            tree = ast.parse(body)
        except (SyntaxError, ValueError):  # IPython syntax (%magic, !cmd): made Python first
            try:
                tree = ast.parse(transform(body)) if transform else None
            except (SyntaxError, ValueError):
                tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            found += [top for top in (n.split(".")[0] for n in names) if top not in found]
    return found


def _not_from_an_index(dist: str) -> str:
    """Where ``dist`` was installed from, when not an index (PEP 610's direct_url.json): "" else."""
    try:
        text = importlib.metadata.distribution(dist).read_text("direct_url.json")
        info = json.loads(text) if text else None
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ""
    if not isinstance(info, dict):
        return ""
    url = str(info.get("url", ""))
    if (info.get("dir_info") or {}).get("editable"):
        return f"an editable install of {url.removeprefix('file://')}"
    if "vcs_info" in info:
        return f"installed from {url} ({info['vcs_info'].get('vcs', 'vcs')})"
    return f"installed from {url.removeprefix('file://')}"


def _needs(dist: str) -> list[str]:
    """The distributions ``dist`` requires, extras left out."""
    try:
        reqs = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [m.group(0) for r in reqs if not _EXTRA.search(r) and (m := _NAME.match(r))]


@dataclass
class Plan:
    wanted: dict[str, str] = field(default_factory=dict)  # dist -> the notebook's version (public part)
    modules: dict[str, list[str]] = field(default_factory=dict)  # dist -> the notebook's modules of it
    builds: dict[str, str] = field(default_factory=dict)  # dist -> the notebook's full version, a local build
    left: list[str] = field(default_factory=list)  # what is not synced, and why: one phrase each


def plan(modules: Iterable[str]) -> Plan:
    p = Plan()
    stdlib, absent, local, own, direct = [], [], [], [], []
    for module in modules:
        if module in _STDLIB:
            stdlib.append(module)
        elif not _importable(module):
            absent.append(module)
        elif not (req := requirement(module)):
            local.append(module)
        else:
            dist, _, version = req.partition("==")
            where = _not_from_an_index(dist)
            if canonical(dist) in OWN:
                own.append(dist)
            elif where:
                direct.append(f"{dist} {version} ({where})")
            else:
                _want(p, dist, version)
                p.modules.setdefault(dist, []).append(module)
    queue, seen = list(p.wanted), {canonical(d) for d in p.wanted} | OWN
    while queue:  # what they need, as installed here (one this notebook lacks: its marker left it out)
        for need in _needs(queue.pop()):
            if canonical(need) in seen:
                continue
            seen.add(canonical(need))
            try:
                dist = importlib.metadata.distribution(need)
            except importlib.metadata.PackageNotFoundError:
                continue
            name = dist.metadata["Name"] or need
            if not _not_from_an_index(name):
                _want(p, name, dist.version)
                queue.append(name)
    if stdlib:
        p.left.append(f"{', '.join(stdlib)}: the standard library (the worker's Python has its own)")
    if local:
        p.left.append(
            f"{', '.join(local)}: not from an installed package (a module beside the notebook: the worker finds it in "
            "the notebook's directory or its synced copy)"
        )
    if direct:
        p.left.append(
            f"{'; '.join(direct)}: not from a package index, so there is no version pip could fetch; install it on "
            "the worker yourself (`%gpu pip install NAME==VERSION` once it is published, or an image that has it)"
        )
    if own:
        p.left.append(f"{', '.join(own)}: what the worker's executor runs on (it keeps its own version)")
    if absent:
        p.left.append(f"{', '.join(absent)}: not installed in this notebook")
    return p


def _want(p: Plan, dist: str, version: str) -> None:
    public, plus, _ = version.partition("+")
    p.wanted[dist] = public
    if plus:
        p.builds[dist] = version


def probe_code(p: Plan) -> str:
    """One statement that prints, on the worker, its versions of ``p.wanted`` (no names bound)."""
    env = {"WANTED": sorted(p.wanted), "MODULES": sorted({m for ms in p.modules.values() for m in ms}), "MARK": MARK}
    return f"exec({PROBE!r}, {env!r})"


def read_probe(text: str) -> dict:
    """The probe's answer from the worker's stdout ({} if it printed none)."""
    for line in text.split("\n"):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return {}


def to_install(p: Plan, have: dict) -> tuple[list[str], list[str], list[str]]:
    """(pins to install, "dist version (the worker had ...)" for each, "dist version" already the same)."""
    pins, changes, same = [], [], []
    for dist, version in sorted(p.wanted.items(), key=lambda kv: kv[0].lower()):
        theirs = have.get(dist)
        if isinstance(theirs, str) and theirs.partition("+")[0] == version:
            same.append(f"{dist} {version}")
            continue
        pins.append(f"{dist}=={version}")
        was = f"the worker had {theirs}" if theirs else "the worker had none"
        build = f"; the notebook's build is {p.builds[dist]}, the index's is asked for" if dist in p.builds else ""
        changes.append(f"{dist} {version} ({was}{build})")
    return pins, changes, same
