"""Stage one's dealing of what is left, and claims: one writer per data shard among any number of processes."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from replaykd.claims import CHANGING, Claim, Claims, this_process
from replaykd.errors import ReplayKDError
from replaykd.storage import LocalStorage
from replaykd.work import Participant, deal, preference, remaining
from tests.conftest import run_cli


def test_deal_balances_by_weight():
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 1000, size=200).tolist()
    for parts in (1, 2, 3, 8):
        shares = deal(weights, parts)
        assert sorted(i for s in shares for i in s) == list(range(200))
        totals = [sum(weights[i] for i in s) for s in shares]
        assert max(totals) - min(totals) <= max(weights)  # greedy: within one shard of each other
    assert deal([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]  # equal shards: equal counts


def test_preference_is_own_share_then_everyone_elses_last_work():
    shares = [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert preference(shares, 0) == [0, 1, 2, 5, 7, 4, 6, 3]
    for me in range(3):
        assert sorted(preference(shares, me)) == list(range(8))


def test_remaining_lists_each_shards_missing_epochs():
    done = np.ones((4, 3), bool)
    done[1, 0] = done[3, 0] = done[0, 2] = False
    work = remaining(done, 4)
    assert [(w.shard_no, w.epochs) for w in work] == [(0, (1, 3)), (2, (0,))]
    assert remaining(done, 1) == [work[1]]  # growing: only the epochs asked for count


def test_participants_from_parts_and_slurm_arrays(monkeypatch):
    assert Participant.of(None, 0, 1) == Participant(0, 1)
    assert Participant.of("2/4", 1, 2) == Participant(5, 8)  # part 2 of 4, rank 1 of its 2
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert Participant.of(None, 0, 1) == Participant(2, 3)
    assert Participant.of("0/1", 0, 1) == Participant(0, 1)  # --part wins
    # --array=0-99:2 (tasks 0, 2, ..., 98): task 98 is the last of 50 parts (it was refused as part 98/50)
    for name, value in (("ID", 98), ("MIN", 0), ("MAX", 98), ("STEP", 2), ("COUNT", 50)):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", str(value))
    assert Participant.of(None, 1, 2) == Participant(49 * 2 + 1, 100)
    # --array=1,5,9: positions the environment does not give; parts 0..8 by number (it was refused as part 8/3)
    for name, value in (("ID", 9), ("MIN", 1), ("MAX", 9), ("STEP", 1), ("COUNT", 3)):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", str(value))
    assert Participant.of(None, 0, 1) == Participant(8, 9)
    for bad in ("3/3", "x", "1-2"):
        with pytest.raises(ReplayKDError, match="part"):
            Participant.of(bad, 0, 1)


def test_of_concurrent_claimers_exactly_one_wins(tmp_path):
    storage = LocalStorage(tmp_path)
    claimers = [Claims(storage, f"launch{i}") for i in range(8)]
    won = []
    barrier = threading.Barrier(len(claimers))

    def reach(c):
        barrier.wait()
        if c.take(3):
            won.append(c)

    threads = [threading.Thread(target=reach, args=(c,)) for c in claimers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0].holds(3)
    assert not any(c.holds(3) for c in claimers if c is not won[0])
    won[0].release(3)
    assert claimers[0].take(3)  # free again once released


def test_a_dead_holders_claim_is_replaced_and_the_old_holder_stops(tmp_path):
    storage = LocalStorage(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its claim is stale at once on this host
    old = Claims(storage, "old")
    assert old.take(0)
    record = "claims/s0-g0/zarr.json"
    claim = json.loads(storage.read(record))["attributes"]
    storage.write(record, json.dumps({"zarr_format": 3, "node_type": "group",
                                      "attributes": {**claim, "pid": pid}}).encode())
    new = Claims(storage, "new")
    assert new.take(0) and new.holds(0)
    assert not old.holds(0)  # the old holder sees it lost the shard and stops writing
    assert storage.read(record) is None and storage.read("claims/s0-g1/zarr.json") is not None


def test_a_claim_on_another_host_is_stale_after_its_lease(tmp_path):
    fresh = Claim("elsewhere:1:x:t", "elsewhere", "elsewhere/boot/pid:[1]", 1, 5, "x", time.time())
    assert not fresh.stale(time.time(), lease=60)
    assert fresh.stale(time.time() + 61, lease=60)
    storage = LocalStorage(tmp_path)
    storage.write("claims/s5-g0/zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                                         "attributes": vars(fresh)}).encode())
    me = Claims(storage, "me", lease=60)
    assert not me.take(5) and me.others_active()  # a live claim elsewhere blocks
    short = Claims(storage, "me", lease=0.0)
    assert short.take(5) and not short.others_active()  # an expired one does not


def test_a_container_with_this_host_name_is_not_judged_by_its_pid():
    # another container on this host, or another machine with the same name: its pid means nothing here
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = this_process("x")
    there = dataclasses.replace(mine, machine=mine.machine + "-other-pid-namespace", pid=int(dead.stdout))
    assert not there.stale(time.time(), lease=60) and there.stale(time.time() + 61, lease=60)
    here = dataclasses.replace(there, machine=mine.machine)
    assert here.stale(time.time(), lease=60)  # the same machine: its process is known to be gone
    reused = dataclasses.replace(mine, started=mine.started - 1)  # this pid, but another process's start
    assert reused.stale(time.time(), lease=60) and not mine.stale(time.time(), lease=60)


def _stale_lock(storage, name: str) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = dataclasses.replace(this_process("killed"), pid=int(dead.stdout), holder="killed")
    storage.write(f"claims/{name}-g0/zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                                            "attributes": vars(claim)}).encode())


def test_of_waiters_on_a_stale_lock_exactly_one_takes_it_over(tmp_path):
    for attempt in range(5):
        storage = LocalStorage(tmp_path / str(attempt))
        _stale_lock(storage, CHANGING)
        waiters = [Claims(storage, f"w{i}") for i in range(6)]
        won, barrier = [], threading.Barrier(len(waiters))

        def wait(c):
            barrier.wait()
            if c.take(CHANGING):
                won.append(c)

        threads = [threading.Thread(target=wait, args=(c,)) for c in waiters]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and won[0].took_over(CHANGING) and won[0].holds(CHANGING)
        assert not any(c.take(CHANGING) for c in waiters if c is not won[0])  # the new holder is live


def test_a_holder_stalled_past_its_lease_changes_no_finished_unit(tmp_path):
    from replaykd.cache import TeacherCache, UnitArrays

    storage = LocalStorage(tmp_path / "s")
    cache = TeacherCache.create_or_grow(tmp_path / "s", _request(topk=5), 2, ["a.tar"], [10], 1, False, {},
                                        Claims(storage, "creator"))
    stalled = Claims(storage, "stalled", lease=0.3)
    assert stalled.take(0)
    mine, theirs = UnitArrays.zeros(10, 5, 10), UnitArrays.zeros(10, 5, 10)
    mine.probs[:], theirs.probs[:] = 0.1, 0.2
    assert cache.write_unit(0, 0, mine)  # while it holds the shard
    time.sleep(0.4)  # no renewal for longer than the lease: another process takes the shard over
    other = Claims(storage, "other", lease=0.3)
    assert other.take(0) and other.holds(0) and not stalled.holds(0)
    assert other.take(0) and cache.write_unit(1, 0, theirs)
    # the stalled one wakes and writes what it had computed: it loses each create, and nothing finished changes
    assert not cache.write_unit(1, 0, mine) and not cache.write_unit(0, 0, theirs)
    assert np.all(cache.read_unit(1, 0).probs == np.float16(0.2)) and np.all(cache.read_unit(0, 0).probs == np.float16(0.1))
    assert not cache.missing()


def test_writing_a_cache_needs_a_backend_that_creates_only_if_absent_in_one_step(digits_dir, teacher_ckpt):
    from replaykd.storage import for_root

    # fsspec's memory file system creates "only if absent" by checking, then writing: refused by name
    with pytest.raises(ReplayKDError, match="memory:// cannot create an object only if it is absent in one request"):
        for_root("memory://caches/x.zarr").create("claims/s0-g0/zarr.json", b"{}")
    proc = run_cli("teacher-cache", "--manifest", digits_dir, "--checkpoint", teacher_ckpt, "--teacher",
                   "regnety_002", "--recipe", "digits-ra", "--epochs", "1", "--workers", "0", "--device", "cpu",
                   "--out", "memory://caches/x.zarr", check=False)
    assert proc.returncode == 2 and "memory:// cannot create an object only if it is absent" in proc.stderr
    import fsspec

    assert not fsspec.filesystem("memory").exists("caches/x.zarr")  # refused before anything was written


def _request(topk=5):
    from replaykd.cache import CacheRequest
    from replaykd.teacher import TeacherIdentity

    teacher = TeacherIdentity("t", "t", None, None, "0" * 64, 10, (0.5,) * 3, (0.5,) * 3, 32, "bicubic")
    return CacheRequest("m" * 64, "train", {"input_size": 16}, "v" * 64, "r", 0, 10, "pillow", teacher, topk)


def test_concurrent_creators_make_one_store_and_a_killed_creation_is_taken_over(tmp_path):
    from replaykd.cache import TeacherCache

    path, made, errors = tmp_path / "store", [], []
    barrier = threading.Barrier(6)

    def create(i):
        barrier.wait()
        try:
            made.append(TeacherCache.create_or_grow(path, _request(), 2 + i % 2, ["a.tar", "b.tar"], [10, 7], 1,
                                                    False, {"created_by": f"l{i}"},
                                                    Claims(LocalStorage(path), f"l{i}")))
        except Exception as exn:  # noqa: BLE001 - reported below
            errors.append(exn)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 6
    cache = TeacherCache.open(path)
    assert cache.config.epochs == 3  # grown by the runs that asked for 3
    assert cache.group["units"].shape[1] == 3 * cache.slots * cache.columns
    assert cache.attrs["created_by"] in {f"l{i}" for i in range(6)}
    assert Claims(LocalStorage(path), "x").current(CHANGING)[1].renewed == 0.0  # the lock is given up
    # a creation killed half-way (its lock left by a process that is gone) is redone by the next run
    other = tmp_path / "killed"
    _stale_lock(LocalStorage(other), CHANGING)
    (other / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    TeacherCache.create_or_grow(other, _request(), 2, ["a.tar"], [10], 1, False, {}, Claims(LocalStorage(other), "me"))
    assert TeacherCache.open(other).config.epochs == 2
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(ReplayKDError, match="exists and is not a teacher cache"):
        TeacherCache.create_or_grow(unrelated, _request(), 2, ["a.tar"], [10], 1, False, {},
                                    Claims(LocalStorage(unrelated), "me"))


def test_a_writer_failure_of_any_kind_ends_the_run_with_its_message(tmp_path):
    from replaykd.cache import TeacherCache, UnitArrays
    from replaykd.cache_writer import UnitWriter, WriteFailed

    cache = TeacherCache.create_or_grow(tmp_path / "s", _request(topk=5), 2, ["a.tar"], [10], 1, False, {},
                                        Claims(LocalStorage(tmp_path / "s"), "x"))
    writer = UnitWriter(cache, depth=1)
    wrong = UnitArrays.zeros(10, 3, 10)  # k = 3 in a store of k = 5: zarr refuses the shape (a ValueError)
    outcome = []

    def feed():
        try:
            for _ in range(20):  # far more than the queue holds: a dead writer thread must not leave put waiting
                writer.put(0, 0, wrong)
            writer.close()
        except WriteFailed as exn:
            outcome.append(str(exn))

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "put or close hung after the writer failed"
    assert outcome and "a write failed (ValueError" in outcome[0] and "rerun the same command" in outcome[0]
    assert cache.missing() == [(0, 0), (1, 0)]  # nothing marked complete


class FailingWrites(LocalStorage):
    """A local store whose record writes fail while `failing` is set (an S3 5xx after botocore's retries, an NFS
    EIO), counting the failures."""

    def __init__(self, root):
        super().__init__(root)
        self.failing, self.failed = False, 0

    def write(self, key: str, data: bytes) -> None:
        if self.failing and key.startswith("claims/"):
            self.failed += 1
            raise OSError(5, "Input/output error")
        super().write(key, data)


def _renewed(storage, key) -> float:
    return json.loads(storage.read(key))["attributes"]["renewed"]


def test_a_failed_renewal_is_tried_again_and_a_claim_not_renewed_stops_the_writes(tmp_path):
    # one failed write ended the renewal thread: five minutes later every record held was stale while the process
    # ran on, and another process took its shards
    storage = FailingWrites(tmp_path)
    claims = Claims(storage, "me", lease=0.8)  # renewed every 0.2 s
    assert claims.take(0)
    key = claims.key(0)
    claims.renew_in_background()
    try:
        storage.failing = True
        deadline = time.time() + 30
        while storage.failed < 2 and time.time() < deadline:
            time.sleep(0.05)
        storage.failing = False
        before = _renewed(storage, key)
        while _renewed(storage, key) == before and time.time() < deadline:
            time.sleep(0.05)
        assert claims._thread.is_alive() and _renewed(storage, key) > before  # renewing again after two failures
        assert claims.holds(0)
        # failing for most of the lease: the holder stops writing under the claim, naming the storage error
        storage.failing, failed, failed_from = True, storage.failed, time.time()
        while (storage.failed == failed or time.time() - failed_from < 0.8 * 0.5 + 0.3) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(ReplayKDError, match=r"could not renew .* s0 .*OSError: \[Errno 5\] Input/output error.*"
                                                r"Every finished unit is kept"):
            claims.holds(0)
    finally:
        storage.failing = False
        claims.release_all()
