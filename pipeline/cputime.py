"""CPU seconds a process and its loader workers use: what a run costs on a machine whose cores it shares, apart
from the time it spends waiting for them."""
from __future__ import annotations

import multiprocessing
import os
import resource
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_workers() -> float | None:
    """CPU seconds of this process and its multiprocessing children (a DataLoader's workers) so far, live or ended;
    None where /proc is not there to read the live children's (not Linux)."""
    if not Path("/proc/self/stat").exists():
        return None
    live = multiprocessing.active_children()  # reaps the ended ones first: their CPU is in RUSAGE_CHILDREN below
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + ended.ru_utime + ended.ru_stime
    for child in live:
        try:
            total += cpu_seconds(child.pid)
        except (FileNotFoundError, ProcessLookupError):  # it ended between the listing and the read
            pass
    return total
