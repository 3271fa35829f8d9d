"""Stage one's writing side: rows of teacher targets assembled into whole units, written off the compute path."""
from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np

from replaykd.cache import TeacherCache, UnitArrays
from replaykd.errors import ReplayKDError


class UnitBuffers:
    """Collects rows of views in slot order; hands back each unit once full."""

    def __init__(self, size: Callable[[int, int], int], topk: int, num_classes: int):
        self.size, self.topk, self.num_classes = size, topk, num_classes  # size(epoch, shard_no): views of a unit
        self.open: dict[tuple[int, int], tuple[UnitArrays, list]] = {}

    def add(self, epochs: np.ndarray, shard_nos: np.ndarray, slots: np.ndarray,
            rows: UnitArrays) -> list[tuple[int, int, UnitArrays]]:
        """Store a batch's rows (views at (epoch, shard_no, slot)), unit by unit, vectorised; returns the
        (epoch, shard_no, arrays) of the units that became complete."""
        done = []
        units = np.stack([epochs, shard_nos], axis=1)
        for epoch, shard_no in np.unique(units, axis=0).tolist():
            sel = (units[:, 0] == epoch) & (units[:, 1] == shard_no)
            size = self.size(epoch, shard_no)
            if (epoch, shard_no) not in self.open:
                self.open[(epoch, shard_no)] = (UnitArrays.zeros(size, self.topk, self.num_classes), [0])
            arrays, filled = self.open[(epoch, shard_no)]
            for name, values in rows.select(sel).arrays().items():
                getattr(arrays, name)[slots[sel]] = values
            filled[0] += int(sel.sum())
            if filled[0] == size:
                del self.open[(epoch, shard_no)]
                done.append((epoch, shard_no, arrays))
        return done


class WriteFailed(ReplayKDError):
    """A unit could not be written (a full disk, a storage error): the units written before it are kept."""


class UnitWriter:
    """Writes completed units on a background thread, off the teacher's compute path. Any failure of a write ends
    the run with its message at the next `put` or at `close` (a full queue never waits on a thread that died).
    `check()`, called before each unit, raises where this process must stop writing (its claims could not be
    renewed); `written(epoch, shard_no)` is told of each unit done, by this process or, found there already
    (`others` counts those), by another."""

    POLL_SECONDS = 0.5

    def __init__(self, cache: TeacherCache, depth: int = 8, written: Callable[[int, int], None] | None = None,
                 check: Callable[[], None] | None = None):
        self.cache, self.error, self.written, self.check = cache, None, written, check
        self.others = 0  # units another process had written first (its copy stays)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="unit-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    if self.check is not None:
                        self.check()
                    self.others += not self.cache.write_unit(*job)
                    if self.written is not None:
                        self.written(job[0], job[1])
                except BaseException as exn:  # noqa: BLE001 - any failure must reach the main thread
                    self.error = exn

    def _check(self) -> None:
        if self.error is not None:
            exn = self.error
            if isinstance(exn, ReplayKDError):
                raise exn
            full = getattr(exn, "errno", None) == 28 or "No space" in str(exn)
            what = "the disk is full" if full else f"a write failed ({type(exn).__name__}: {exn})"
            raise WriteFailed(f"{what} while writing {self.cache.path}; completed units are kept: "
                              + ("free space and " if full else "") + "rerun the same command to resume") from exn

    def put(self, epoch: int, shard_no: int, data: UnitArrays) -> None:
        """Queue one complete unit for writing (blocks while the queue is full and the writer is alive)."""
        self._check()
        while True:
            try:
                self.queue.put((epoch, shard_no, data), timeout=self.POLL_SECONDS)
                return
            except queue.Full:
                self._check()

    def close(self, check: bool = True) -> None:
        """Finish all queued writes; raise if any failed (unless `check` is off: another error is on its way)."""
        while self.thread.is_alive():
            try:
                self.queue.put(None, timeout=self.POLL_SECONDS)
                break
            except queue.Full:
                continue
        self.thread.join()
        if check:
            self._check()
