"""The worker's side of a cell's imports: which of the modules the notebook has (sent as
``content["imports"]``, ``{module: "DIST==VERSION" or ""}``) this worker lacks, stopping
the cell before anything runs, and which it has in another version, one line each."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys


class ImportCheck:
    def __init__(self) -> None:
        self._found: set[tuple[str, str]] = set()  # (module, cwd) found once: found for the worker's life
        self._versions: dict[str, str] = {}  # dist -> version, of a module already imported (it stays)

    def _present(self, module: str) -> bool:
        if module in sys.modules:
            return True
        key = (module, os.getcwd())
        if key in self._found:
            return True
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:  # installed since this worker last looked (`%pip install` in an earlier cell)?
            importlib.invalidate_caches()
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
        if found:
            self._found.add(key)
        return found

    def _version(self, module: str, dist: str) -> str | None:
        here = self._versions.get(dist)
        if here is None:
            try:
                here = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                return None
            if module in sys.modules:  # the version in use now, whatever is installed later
                self._versions[dist] = here
        return here

    def check(self, imports: object) -> tuple[str, list[str]]:
        """(the error that stops the cell, or ""; the notes on versions that differ)."""
        if not isinstance(imports, dict):
            return "", []
        missing, notes = [], []
        for module, req in imports.items():
            if not isinstance(module, str) or not module.isidentifier():
                continue
            dist, _, version = (req if isinstance(req, str) else "").partition("==")
            if not self._present(module):
                missing.append((module, dist, version))
            elif dist and version:
                here = self._version(module, dist)
                if here is None:
                    continue  # present, though not as that distribution: nothing to compare
                if here != version:
                    notes.append(f"{dist} {here} on the worker, {version} in the notebook")
        return (_missing_text(missing) if missing else ""), notes


def _missing_text(missing: list[tuple[str, str, str]]) -> str:
    names = ", ".join(m for m, _, _ in missing)
    verb = "is" if len(missing) == 1 else "are"
    has = "; ".join(
        f"{m} {version}" + (f" (from {dist})" if _canonical(dist) != _canonical(m) else "")
        if version
        else f"{m}, not from an installed package (a module beside the notebook?)"
        for m, dist, version in missing
    )
    pins = " ".join(f"{dist}=={version}" for _, dist, version in missing if version)
    text = (
        f"{names} {verb} imported by this cell but not installed on the worker (the notebook has {has}); nothing ran."
    )
    if pins:
        it = "it" if len(missing) == 1 else "them"
        text += (
            f" Install {it} on the worker: run `%pip install {pins}` in a %%gpu cell, or (docker backend) run the"
            f" cell in an image that has {it}: `%%gpu --image IMAGE` (`jupyter gpu image build --from IMAGE` adds"
            " what jupyter-gpu needs to any image)."
        )
    else:
        text += (
            " Put it where the worker finds it: beside the notebook (the worker works in the notebook's directory"
            " or its synced copy, unless --no-sync)."
        )
    return text


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
