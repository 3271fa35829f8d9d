"""CPU seconds of a process with its loader workers: a child's CPU counts while it is alive."""
from __future__ import annotations

import multiprocessing
import time

from pipeline import cputime


def _burn(seconds: float, started) -> None:
    started.set()
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    time.sleep(60)  # alive, idle: its CPU stays readable until the test stops it


def test_a_live_childs_cpu_counts_and_this_process_waiting_costs_nothing():
    context = multiprocessing.get_context("fork")  # as a DataLoader's workers start on Linux
    started = context.Event()
    child = context.Process(target=_burn, args=(0.5, started), daemon=True)
    before = cputime.with_workers()
    child.start()
    try:
        started.wait(30)
        mine = time.process_time()
        time.sleep(1.0)  # waiting uses no CPU of this process; the child burns 0.5 s meanwhile
        assert time.process_time() - mine < 0.2
        spent = cputime.with_workers() - before
        assert 0.45 <= spent < 1.0, spent
        assert cputime.cpu_seconds(child.pid) >= 0.45
    finally:
        child.terminate()
        child.join()
