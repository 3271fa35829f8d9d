"""CPU seconds of a process with its loader workers: a child's CPU counts while it is alive, and after it ended."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from replaykd import cputime

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _burn(seconds: float, done, stay: bool) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    done.set()
    if stay:
        time.sleep(120)  # alive, idle: its CPU is read from /proc until the test stops it


@pytest.mark.parametrize("stay", [True, False], ids=["alive", "ended"])
def test_a_childs_cpu_counts_alive_or_ended(stay):
    context = multiprocessing.get_context("fork")  # as a DataLoader's workers start on Linux
    done = context.Event()
    child = context.Process(target=_burn, args=(0.5, done, stay), daemon=True)
    before, mine = cputime.with_workers(), time.process_time()
    child.start()
    try:
        assert done.wait(120)
        if not stay:
            child.join(120)
        spent = cputime.with_workers() - before - (time.process_time() - mine)
        assert 0.45 <= spent < 1.0, spent  # the child's half second, this process's own CPU aside
    finally:
        child.terminate()
        child.join()
