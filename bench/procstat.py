"""A process's CPU time and resident memory, read from /proc. Standard library only: the
gateway bench's child imports it beside another checkout's packages."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int, descendants: bool = False) -> float:
    """User + system CPU of a process so far (clock ticks from /proc); with `descendants`,
    plus that of the processes it started and that still run (services.workers' workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if descendants:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child), descendants=True)
    return total


def rss_mb(pid: int) -> float:
    """A process's resident memory, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
