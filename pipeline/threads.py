"""How many compute threads a replaykd process takes: its share of the cores it may use among the replaykd processes
that compute on those cores now (`replaykd.device.set_threads` applies it).

The cores a process may use are its CPU affinity (a scheduler's cpuset: Slurm's, a container's), capped by a cgroup
CPU quota (a container's CPU limit). Each computing process holds a seat: a file in a per-user folder naming its
cores, locked (flock) for as long as the process lives, so a process that ends, however it ends, leaves its seat (its
lock goes with it); a process counts the seats whose cores overlap its own, so two jobs a scheduler gave cores of
their own do not halve each other. Two runs on the same cores each take half, as a run started later is seen by the
earlier one at its next epoch.

Loader workers: on a GPU the process mostly launches kernels while its workers do the CPU's work, so they get their
cores first (a rank's threads: its share less its workers, at least one: 8 ranks with 10 workers each on 64 cores
take one thread each). On the CPU the training process does the arithmetic and the workers need a fraction of a core
at these sizes; a core they leave idle is lost to a process that counted it theirs (one demo student with 2 workers
on 2 cores: 524 img/s on 1 thread, 680 on 2), so there the workers are not subtracted.
"""
from __future__ import annotations

import fcntl
import math
import os
import tempfile
import uuid
from pathlib import Path

_seat: tuple[int, Path, object] | None = None  # (pid, path, open file holding the lock) of this process's seat


def affinity() -> frozenset[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def _limits(folder: Path) -> float | None:
    """The cores a cgroup folder's CPU quota allows (v2 cpu.max, v1 cfs quota), None where it sets none."""
    try:
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").exists():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None


def cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cores a cgroup CPU quota allows this process (the tightest along its cgroup's path), None without one."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            bases = [root, root / "unified"]  # v2, alone or beside v1
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu"]
        else:
            continue
        # inside a container its cgroup is mounted as the root: a path of the host's is not found there
        parts = [p for p in path.split("/") if p]
        for base in bases:
            for depth in range(len(parts), -1, -1):
                limit = _limits(base.joinpath(*parts[:depth]))
                if limit is not None:
                    found.append(limit)
    return min(found) if found else None


def cores() -> int:
    """The cores this process may use: its affinity, capped by a cgroup CPU quota."""
    quota = cpu_quota()
    n = len(affinity())
    return max(1, min(n, math.floor(quota))) if quota else n  # a fraction of a core more would be throttled


def seats_folder() -> Path:
    """Where the seats of this user's computing processes lie."""
    return Path(tempfile.gettempdir()) / f"replaykd-{os.getuid()}" / "compute"


def _take_seat(folder: Path) -> Path | None:
    """This process's seat (taken once per process; a forked child takes its own), None where none can be taken."""
    global _seat
    if _seat is not None and _seat[0] == os.getpid():
        return _seat[1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial = folder / f".{name}"
        held = open(partial, "w")
        held.write(",".join(map(str, sorted(affinity()))))  # the cores it computes on
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(partial, folder / name)  # only locked seats are ever visible: a counter never removes a new one
    except OSError:
        return None
    _seat = (os.getpid(), folder / name, held)
    return folder / name


def _overlaps(seat: str, mine: frozenset[int]) -> bool:
    """Whether a seat's cores (as written by `_take_seat`; none written: unknown) overlap `mine`."""
    try:
        return not seat.strip() or bool(mine & {int(c) for c in seat.split(",")})
    except ValueError:
        return True


def computing_processes(folder: Path | None = None) -> int:
    """replaykd processes computing on this process's cores now, this one included (seats of ended processes are
    removed)."""
    folder = folder or seats_folder()
    mine, cpus = _take_seat(folder), affinity()
    count = 1
    try:
        seats = [p for p in folder.iterdir() if not p.name.startswith(".") and p != mine]
    except OSError:
        return count
    for path in seats:
        try:
            with open(path) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    count += _overlaps(f.read(), cpus)
                    continue
                path.unlink(missing_ok=True)
        except OSError:
            continue
    return count


def share(threads: int | None, workers: int = 0, on_gpu: bool = False) -> int:
    """Compute threads for this process: `threads`, else its share of its cores among the replaykd processes
    computing on them now (torchrun's processes on this machine included), less its loader `workers` when it trains
    `on_gpu`; at least 1."""
    if threads:
        return threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    mine = max(1, cores() // max(local, computing_processes()))
    return max(1, mine - workers) if on_gpu else mine
