"""Finding Tandem rank processes through /proc (to prove none is left behind)."""

from __future__ import annotations

import os
from pathlib import Path


def rank_processes(parent: int | None = None) -> list[int]:
    """PIDs of `python -m tandem.executors.rank` processes whose parent is `parent` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"tandem.executors.rank" in cmdline:
            found.append(int(entry.name))
    return found
