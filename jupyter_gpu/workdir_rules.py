"""``.gitignore``-style rules for the workspace sync: one ignore file's patterns
(``Rules``), and a matcher for a stack of them (the built-in excludes, then each
directory's ``.gitignore`` and ``.jupyter-gpu-ignore``; last match wins, deeper files
after shallower ones)."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from kernel_worker.workspace_tree import glob_regex


class Rules:
    """One ignore file's patterns, for paths relative to the directory it sits in (``base``).
    Consecutive patterns of one kind (negated or not, directories only or not) are joined
    into one regex, so a file costs a few matches, not one per pattern."""

    def __init__(self, lines: Iterable[str], base: str = "") -> None:
        self.lines = tuple(lines)
        self.base = base
        self.groups: list[tuple] = []  # negate, dir_only, name regex, path regex (sources and fullmatch)
        pending: list[tuple[bool, bool, str, bool]] = []
        for line in self.lines:
            rule = self._parse(line)
            if rule is None:
                continue
            if pending and pending[-1][:2] != rule[:2]:
                self._flush(pending)
            pending.append(rule)
        self._flush(pending)

    @staticmethod
    def _parse(line: str) -> tuple[bool, bool, str, bool] | None:
        line = line.rstrip("\n\r")
        if line.endswith("\\ "):
            line = line[:-2].rstrip(" ") + "\\ "
        else:
            line = line.rstrip(" ")
        if not line or line.startswith("#"):
            return None
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            return None
        anchored = "/" in line
        return negate, dir_only, glob_regex(line.lstrip("/")), anchored

    def _flush(self, pending: list) -> None:
        if not pending:
            return
        negate, dir_only = pending[0][:2]
        names = "|".join(f"(?:{rx})" for *_, rx, anchored in pending if not anchored)
        rels = "|".join(f"(?:{rx})" for *_, rx, anchored in pending if anchored)
        fm = [re.compile(x).fullmatch if x else None for x in (names, rels)]
        self.groups.append((negate, dir_only, fm[0], fm[1], names, rels))
        pending.clear()

    def match(self, rel: str, name: str, is_dir: bool) -> bool | None:
        """True: excluded, False: re-included, None: no pattern here says."""
        if self.base:
            rel = rel[len(self.base) + 1 :]
        for negate, dir_only, by_name, by_rel, *_ in reversed(self.groups):
            if dir_only and not is_dir:
                continue
            if (by_name is not None and by_name(name)) or (by_rel is not None and by_rel(rel)):
                return not negate
        return None


def _excluded(layers: Sequence[Rules], rel: str, name: str, is_dir: bool) -> bool:
    for rules in reversed(layers):
        said = rules.match(rel, name, is_dir)
        if said is not None:
            return said
    return False


def _matcher(layers: tuple[Rules, ...]) -> Callable[[str, str, bool], bool]:
    """excluded(rel, name, is_dir) for one stack of ignore files. With no '!' anywhere,
    order cannot matter, so every name pattern joins one regex: the usual case costs one
    match per entry."""
    if any(g[0] for r in layers for g in r.groups):
        return lambda rel, name, is_dir: _excluded(layers, rel, name, is_dir)
    srcs = [(g[1], g[4]) for r in layers for g in r.groups if g[4]]
    files = "|".join(f"(?:{x})" for d, x in srcs if not d)
    dirs = "|".join(f"(?:{x})" for _, x in srcs)
    by_file = re.compile(files).fullmatch if files else lambda _: None
    by_dir = re.compile(dirs).fullmatch if dirs else lambda _: None
    by_rel = [(len(r.base) + 1 if r.base else 0, g[1], g[3]) for r in layers for g in r.groups if g[5]]

    def excluded(rel: str, name: str, is_dir: bool) -> bool:
        if (by_dir if is_dir else by_file)(name):
            return True
        return any((is_dir or not dir_only) and match(rel[cut:]) for cut, dir_only, match in by_rel)

    def by_name_only(rel: str, name: str, is_dir: bool) -> bool:
        return (by_dir if is_dir else by_file)(name) is not None

    return excluded if by_rel else by_name_only
