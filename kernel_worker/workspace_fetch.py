"""Reading files out of a workspace for ``%gpu fetch`` (FETCH): relpaths, directories and
globs, every name checked, every file opened a directory at a time with ``O_NOFOLLOW``,
and the whole bounded (``Workspaces.max_fetch_bytes``) before it is sent."""

from __future__ import annotations

import re
import stat
from typing import Sequence

from kernel_worker.workspace_tree import Tree, WorkspaceError, _walk, check_relpath, glob_regex, human, shown


def read_files(tree: str, wanted: Sequence[str], most: int) -> dict[str, bytes]:
    """Contents of the files under ``tree`` that ``wanted`` names: each item a relpath (a
    directory brings everything in it) or a glob relative to ``tree`` (``*.png`` at the
    top, ``**/*.csv`` anywhere, ``out/**``). Refuses a missing name, a pattern that matches
    nothing, and more than ``most`` bytes in all."""
    left = most
    names: list[str] = []
    listing: list[str] = []
    with Tree(tree) as t:
        for item in wanted:
            glob = isinstance(item, str) and any(c in item for c in "*?[")
            item = item.rstrip("/") or "/" if isinstance(item, str) else item
            check_relpath(re.sub(r"[*?\[\]]", "x", item) if glob else item)
            if not glob:
                try:
                    if not stat.S_ISDIR(t.lstat(item).st_mode):
                        names.append(item)
                        continue
                except FileNotFoundError:
                    raise WorkspaceError(f"the workspace has no file {shown(item)}") from None
            listing = listing or sorted(rel for rel, _ in _walk(tree))
            match = re.compile(glob_regex(item) if glob else re.escape(item) + "/.*").fullmatch
            hits = [r for r in listing if match(r)]
            if not hits:
                raise WorkspaceError(f"no file in the workspace matches {shown(item)}")
            names += hits
        out: dict[str, bytes] = {}
        for rel in dict.fromkeys(names):
            try:
                out[rel] = data = t.read(rel, left)
            except FileNotFoundError:
                raise WorkspaceError(f"the workspace has no file {shown(rel)}") from None
            left -= len(data)
            if left < 0:
                raise WorkspaceError(
                    f"fetch refused: {len(out)} file(s) up to {shown(rel)} come to more than {human(most)} "
                    "(Workspaces.max_fetch_bytes); fetch fewer files"
                )
    return out
