"""Checking a notebook's manifest against what its workspace holds, before a sync writes
anything: the manifest, the files sent and the files to copy all come from a client, so a
malformed one is refused whole, in one pass (it runs before every cell)."""

from __future__ import annotations

from typing import Mapping, Sequence

from kernel_worker.workspace_tree import _SHA_RE, BadPath, Data, Stat, WorkspaceError, check_relpath, shown


def check_manifest(
    st: Mapping[str, list],
    manifest: Mapping[str, Sequence],
    files: Mapping[str, Data],
    copy: Mapping[str, Stat],
    max_files: int,
) -> list[str]:
    """Raise BadPath or WorkspaceError unless ``manifest`` (relpath -> (size, hash, mode))
    can be applied to a workspace whose sync state is ``st``, given ``files`` (relpath ->
    contents) and ``copy`` (relpath -> the stat to copy it with). Returns the relpaths
    whose only change is the executable bit."""
    if len(manifest) > max_files:
        raise WorkspaceError(f"the manifest lists {len(manifest)} files, over Workspaces.max_files={max_files}")
    new, chmods = [], []
    for rel, entry in manifest.items():
        old = st.get(rel)
        if old is None:  # what the state holds was checked when it was written
            check_relpath(rel)
            new.append(rel)
        try:
            size, sha, mode = entry
        except (TypeError, ValueError):
            size = sha = mode = None
        if type(size) is not int or size < 0 or type(mode) is not int:
            raise WorkspaceError(f"manifest entry for {shown(rel)} is not (size, hash, mode)")
        if old is not None and sha == old[1]:
            if rel not in files and (old[2] ^ mode) & 0o111:
                chmods.append(rel)
            continue
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise WorkspaceError(f"manifest entry for {shown(rel)} has no content hash")
        if rel not in files and rel not in copy:
            raise WorkspaceError(f"no contents sent for {shown(rel)}, which the workspace lacks")
    # A file and a directory of one name cannot both be: only a new name can collide
    # (the state mirrors a real tree), so only then is every name's parent listed.
    both = new and {rel[:i] for rel in manifest for i, c in enumerate(rel) if c == "/"} & manifest.keys()
    if both:
        raise BadPath(f"{shown(min(both))} is listed both as a file and as a directory")
    for rel, data in files.items():
        entry = manifest.get(rel)
        if entry is None:
            raise WorkspaceError(f"{shown(rel)} was sent but is not in the manifest")
        if memoryview(data).nbytes != entry[0]:
            raise WorkspaceError(f"{shown(rel)}: {memoryview(data).nbytes} bytes sent, the manifest says {entry[0]}")
    for rel, want in copy.items():
        entry = manifest.get(rel)
        if entry is None or len(want) != 4 or want[0] != entry[0]:
            raise WorkspaceError(f"{shown(rel)} is to be copied but its size is not the manifest's")
    return chmods
