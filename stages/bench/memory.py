"""Peak memory of a process and its loader workers, sampled from /proc while a benchmark runs."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Child processes of `pid`."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident, private) MB of a process now (private: pages no other process shares, smaps_rollup)."""
    rss = private = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
    except OSError:
        pass
    return rss / 1024, private / 1024


class PeakMemory:
    """Samples a process and its children (but those in `skip`) every 50 ms: peak resident MB of the process, and
    the largest peak resident and private MB of any one child (a loader worker)."""

    def __init__(self, pid: int, skip: frozenset[int] | set[int] = frozenset()):
        self.pid, self.skip, self.main_rss, self.worker_rss, self.worker_private = pid, skip, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.main_rss = max(self.main_rss, memory_mb(self.pid)[0])
            try:
                kids = children(self.pid)
            except OSError:
                kids = []
            for kid in set(kids) - self.skip:
                rss, private = memory_mb(kid)
                self.worker_rss, self.worker_private = max(self.worker_rss, rss), max(self.worker_private, private)
            time.sleep(0.05)

    def stop(self) -> dict:
        """The peaks, in MB."""
        self._stop.set()
        self._thread.join()
        return {"main_rss_mb": round(self.main_rss), "worker_rss_mb": round(self.worker_rss),
                "worker_private_mb": round(self.worker_private)}
