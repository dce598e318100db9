"""Which way a notebook's values travelled: a spy on the in-process client's use of the
bulk path (``kernel_worker.bulk``), seeing each bulk file it wrote, with its size, the
moment it was written, and each one it mapped back in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kernel_worker import bulk


@dataclass
class BulkSpy:
    sent: list[dict] = field(default_factory=list)  # {"dir", "file", "size", "on_disk"} per file written
    received: list[dict] = field(default_factory=list)  # {"dir", "file", "size"} per file mapped back in

    def sizes_sent(self) -> list[int]:
        return [f["size"] for f in self.sent]

    def sizes_received(self) -> list[int]:
        return [f["size"] for f in self.received]


def spy_on_bulk(monkeypatch) -> BulkSpy:  # noqa: ANN001
    """Wrap ``bulk.offload`` and ``bulk.restore`` (the magic and serialize call them through
    the module) so a test can prove which values went through bulk files."""
    spy = BulkSpy()
    offload, restore = bulk.offload, bulk.restore

    def spied_offload(frames, directory, first=0):  # noqa: ANN001, ANN202
        out, moved = offload(frames, directory, first)
        for ref in moved.values():
            path = os.path.join(directory, ref["file"])
            on_disk = os.path.getsize(path) if os.path.exists(path) else None
            spy.sent.append({"dir": directory, "file": ref["file"], "size": ref["size"], "on_disk": on_disk})
        return out, moved

    def spied_restore(frames, moved, directory):  # noqa: ANN001, ANN202
        for ref in moved.values():
            spy.received.append({"dir": directory, "file": ref["file"], "size": ref["size"]})
        return restore(frames, moved, directory)

    monkeypatch.setattr(bulk, "offload", spied_offload)
    monkeypatch.setattr(bulk, "restore", spied_restore)
    return spy
