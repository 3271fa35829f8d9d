"""Stage one's work: who builds which data shards of a store, dealt by what is left.

Every participant (a rank of a torchrun launch, a part of a job array such as Slurm's, or an independent run)
reads which units are still missing, and deals the data shards that have some between all participants, balanced
by their missing views (largest first to the lightest share). It works through its own share first, then takes
what is left of the others' (from their ends), so a participant that finishes early helps the others, a rerun
after a kill finishes the store, and no participant waits for another: each takes a shard only by claiming it
(`pipeline/claims.py`), so a shard has one writer whatever the participants' views of the store were when they
started. A shard is decoded once for all its missing epochs.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from replaykd.errors import ReplayKDError


@dataclass(frozen=True)
class ShardWork:
    """Stage one's work on one data shard: the epochs whose units it still needs."""

    shard_no: int
    epochs: tuple[int, ...]


@dataclass(frozen=True)
class Participant:
    """This process's place among those building a store: `index` of `count`."""

    index: int
    count: int

    @classmethod
    def of(cls, part: str | None, rank: int, world: int) -> "Participant":
        """From `--part I/N` (else a Slurm job array's task, `_slurm_part`, else one part) and the torchrun rank and
        world size within the part."""
        if part:
            try:
                i, n = (int(v) for v in part.split("/"))
            except ValueError:
                raise ReplayKDError(f"--part must be I/N (e.g. 0/4), got {part!r}") from None
        elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
            i, n = _slurm_part()
        else:
            i, n = 0, 1
        if not 0 <= i < n:
            raise ReplayKDError(f"part {i}/{n}: the part index must be in [0, {n})")
        return cls(i * world + rank, n * world)


def _slurm_part() -> tuple[int, int]:
    """This Slurm array task's part: its position among the array's tasks when they are evenly spaced
    (`--array=0-99:2`: SLURM_ARRAY_TASK_MIN, _STEP, _COUNT); for a list of task numbers (`--array=1,5,9`, whose
    positions the environment does not give) its number above the lowest, of as many parts as numbers between the
    lowest and the highest: parts that never run are taken up by the others once they are done with their own."""
    values = {}
    for name in ("ID", "MIN", "MAX", "STEP", "COUNT"):
        value = os.environ.get(f"SLURM_ARRAY_TASK_{name}")
        try:
            values[name] = None if value is None else int(value)
        except ValueError:
            raise ReplayKDError(f"SLURM_ARRAY_TASK_{name}={value!r} is not an integer (a Slurm job array sets it to a "
                                "task number): unset it, or pass --part I/N") from None
    task, count = values["ID"], values["COUNT"]
    low, step = values["MIN"] or 0, values["STEP"] or 1
    high = low + step * (count - 1) if values["MAX"] is None else values["MAX"]
    if high - low == step * (count - 1) and (task - low) % step == 0:
        return (task - low) // step, count
    return task - low, high - low + 1


def remaining(done: np.ndarray, epochs: int) -> list[ShardWork]:
    """The data shards with units missing among the first `epochs` epochs, with those epochs."""
    return [ShardWork(s, tuple(int(e) for e in np.flatnonzero(~done[:epochs, s])))
            for s in range(done.shape[1]) if not done[:epochs, s].all()]


def deal(weights: list[int], parts: int) -> list[list[int]]:
    """Indices of `weights` dealt into `parts` lists of near-equal total weight: heaviest first, each to the
    lightest list so far (ties to the lowest list); each list in index order."""
    shares, totals = [[] for _ in range(parts)], [0] * parts
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        lightest = min(range(parts), key=lambda p: (totals[p], p))
        shares[lightest].append(i)
        totals[lightest] += weights[i]
    return [sorted(s) for s in shares]


def preference(shares: list[list[int]], me: int) -> list[int]:
    """The order in which participant `me` tries shards: its own share, then what the others reach last."""
    others = [list(reversed(shares[(me + k) % len(shares)])) for k in range(1, len(shares))]
    stolen = [i for step in range(max(map(len, others), default=0)) for share in others if step < len(share)
              for i in [share[step]]]
    return shares[me] + stolen


class Dealer:
    """Feeds loader workers with claimed shards: claims the next shard in preference order whenever fewer than
    `depth` claimed shards wait in `jobs` unstarted, and ends each worker's stream when nothing claimable is left.
    After a claim, `todo(shard_no)` reads which of its epochs are still missing (another process may have built
    them meanwhile)."""

    POLL_SECONDS = 0.05

    def __init__(self, work: list[ShardWork], order: list[int], claims, todo: Callable[[int], tuple[int, ...]],
                 jobs, workers: int, depth: int):
        self.work, self.order, self.claims, self.todo, self.jobs = work, list(order), claims, todo, jobs
        self.workers, self.depth, self._stop = max(1, workers), depth, threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dealer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for i in self.order:
                while self.jobs.qsize() >= self.depth and not self._stop.is_set():
                    self._stop.wait(self.POLL_SECONDS)
                if self._stop.is_set():
                    break
                shard_no = self.work[i].shard_no
                epochs = self.todo(shard_no) if self.claims.take(shard_no) else ()
                if epochs:
                    self.jobs.put(ShardWork(shard_no, epochs))
                elif shard_no in self.claims.held:
                    self.claims.release(shard_no)
        except BaseException as exn:  # noqa: BLE001 - reported by the main thread
            self.error = exn
        finally:
            for _ in range(self.workers):
                self.jobs.put(None)

    def stop(self) -> None:
        """Claim nothing more, and wait until the dealing thread has stopped (so every claim it took is known)."""
        self._stop.set()
        self.thread.join()
