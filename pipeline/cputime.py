"""CPU seconds a process and its loader workers use: what a run costs on a machine whose cores it shares, apart
from the time it spends waiting for them."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_workers() -> float | None:
    """CPU seconds of this process and its live multiprocessing children (a DataLoader's workers) so far; None where
    /proc is not there to read the children's (not Linux)."""
    if not Path("/proc/self/stat").exists():
        return None
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            total += cpu_seconds(child.pid)
        except (FileNotFoundError, ProcessLookupError):  # it exited between the listing and the read
            pass
    return total
