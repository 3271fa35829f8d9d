"""How many compute threads a replaykd process takes: its share of the cores among the replaykd processes that
compute on this machine now (`replaykd.device.set_threads` applies it).

Each computing process holds a seat: a file in a per-user folder, locked (flock) for as long as the process lives, so
a process that ends, however it ends, leaves its seat (its lock goes with it). Loader workers are not counted: at
small sizes they need a fraction of a core, and a core they leave idle is lost to a process that counted it theirs
(one demo student with 2 workers on 2 cores: 524 img/s on 1 thread, 680 on 2). Two runs at once each take half, as a
run started later is seen by the earlier one at its next epoch.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from pathlib import Path

_seat: tuple[int, Path, object] | None = None  # (pid, path, open file holding the lock) of this process's seat


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(partial, folder / name)  # only locked seats are ever visible: a counter never removes a new one
    except OSError:
        return None
    _seat = (os.getpid(), folder / name, held)
    return folder / name


def computing_processes(folder: Path | None = None) -> int:
    """replaykd processes computing on this machine now, this one included (seats of ended processes are removed)."""
    folder = folder or seats_folder()
    mine = _take_seat(folder)
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
                    count += 1
                    continue
                path.unlink(missing_ok=True)
        except OSError:
            continue
    return count


def share(threads: int | None) -> int:
    """Compute threads for this process: `threads`, else its share of the cores among the replaykd processes computing
    on this machine now (torchrun's processes on it included), at least 1."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return threads or max(1, cores() // max(local, computing_processes()))
