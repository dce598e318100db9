"""Which installed modules a cell imports, with the notebook's version of each: sent with
the cell (``content["imports"]``) so the worker can stop it, before anything runs, when it
lacks one, and say so when its version differs.

Only the cell's own top-level statements count (an import inside a function, a ``try``
or an ``if`` may be guarded, or never run); relative imports, ``__future__``, the standard
library and modules the notebook itself cannot import are left out, and so is a cell that
installs packages (``%pip install``, ``!pip install``), which may be installing them there.
Each value is ``DIST==VERSION`` (the distribution that provides the module, as pip names
it), or "" for a module of no installed distribution (``helper.py`` beside the notebook).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re
import sys
from typing import Callable

_STDLIB = frozenset(sys.stdlib_module_names) | {"__main__"}
_INSTALLS = re.compile(r"\b(pip|conda|mamba|uv)\b[^\n]*\binstall\b")


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> the distributions that provide it (about 0.1 s: once per kernel)."""
    return importlib.metadata.packages_distributions()


def requirement(module: str) -> str:
    """``DIST==VERSION`` for the distribution that provides ``module`` here, else ""."""
    try:  # the common case (numpy is numpy's): no scan of every distribution
        dist = importlib.metadata.distribution(module)
        return f"{dist.metadata['Name'] or module}=={dist.version}"
    except importlib.metadata.PackageNotFoundError:
        pass
    for name in _distributions().get(module, []):  # sklearn is scikit-learn's, yaml PyYAML's
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _importable(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _top_level(tree: ast.Module) -> list[str]:
    out: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found = [node.module]
        else:
            continue
        for name in found:
            top = name.split(".")[0]
            if top not in out and top not in _STDLIB:
                out.append(top)
    return out


_CACHE: dict[str, dict[str, str]] = {}
_CACHE_SIZE = 256


def imports_of(cell: str, transform: Callable[[str], str] | None = None) -> dict[str, str]:
    """``{module: "DIST==VERSION" or ""}`` for the installed modules ``cell`` imports at its
    top level; {} at no cost for a cell with no ``import`` in its text. Cached per cell
    text: a cell run again costs a dictionary lookup."""
    if "import" not in cell:
        return {}
    found = _CACHE.get(cell)
    if found is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        found = _CACHE[cell] = _of(cell, transform)
    return dict(found)


def _of(cell: str, transform: Callable[[str], str] | None) -> dict[str, str]:
    if _INSTALLS.search(cell):
        return {}
    try:
        tree = ast.parse(cell)
    except SyntaxError:  # IPython syntax (%magic, !cmd): made Python first, as closure.names_read does
        try:
            tree = ast.parse(transform(cell) if transform else cell)
        except SyntaxError:
            return {}
    return {m: requirement(m) for m in _top_level(tree) if _importable(m)}
