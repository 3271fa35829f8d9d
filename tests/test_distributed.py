"""Many processes, many nodes, restarts: both stages under torchrun (gloo on the CPU), two "nodes" on one host by
c10d rendezvous, and torchrun's elastic restarts resuming by themselves to the result of an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from replaykd.cache import TeacherCache
from replaykd.cache_report import run_records
from replaykd.errors import ReplayKDError
from replaykd.loader import ReplayViews
from replaykd.manifest import Manifest
from replaykd.recipe import Recipe
from replaykd.stages.options import StudentOptions
from replaykd.stages.train_student import run as train
from tests.conftest import arrays, options
from tests.test_teacher_cache import assert_same_arrays

pytestmark = pytest.mark.slow

STUDENT = ["--recipe", "digits-ra", "--epochs", "2", "--patch-size", "4", "--depth", "1", "--embed-dim", "32",
           "--num-heads", "2", "--batch-size", "32", "--workers", "0", "--device", "cpu", "--drop-path", "0.2",
           "--threads", "1"]  # the same bits need the same thread count (floats are summed in another order)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launch) -> list[str]:
    """The torchrun command line (python -m torch.distributed.run) with `launch` options."""
    return [sys.executable, "-m", "torch.distributed.run", *map(str, launch), "-m", "replaykd"]


def start(cmd: list, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in (env or {}).items()}}, **kw)


def finish(*procs: subprocess.Popen, timeout: int = 400) -> list[str]:
    """Wait for the launches; their standard outputs."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outs)
    return [out for out, _ in outs]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_a_worker_when(agent: subprocess.Popen, ready, timeout: int = 300) -> None:
    """SIGKILL one worker process of a torchrun agent once `ready()`, as a crashed rank would die."""
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline and agent.poll() is None, "the run ended before a worker could be killed"
        time.sleep(0.05)
    workers = [int(p) for t in os.listdir(f"/proc/{agent.pid}/task")
               for p in open(f"/proc/{agent.pid}/task/{t}/children").read().split()]
    os.kill(workers[-1], signal.SIGKILL)


def two_nodes(args: list, *launch) -> list[subprocess.Popen]:
    """Two torchrun "nodes" of one process each on this host, meeting by c10d rendezvous on localhost."""
    port, run_id = free_port(), f"replaykd-{os.getpid()}-{time.time_ns()}"
    return [start(torchrun("--nnodes", 2, "--nproc-per-node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint",
                           f"127.0.0.1:{port}", "--rdzv-id", run_id, *launch) + args) for _ in range(2)]


@pytest.fixture(scope="module")
def reference(digits_dir, store, tmp_path_factory):
    """An uninterrupted run of cached KD on two "nodes" (the digits shards are uneven: 7 of 200 and one of 37)."""
    out = tmp_path_factory.mktemp("ddp") / "reference"
    finish(*two_nodes(["train-student", "--out", out, "--manifest", digits_dir, "--cache", store, *STUDENT]))
    return out


def test_two_processes_take_equal_full_steps_with_their_own_randomness(digits_dir, reference):
    ds = ReplayViews(Manifest.load(digits_dir), Recipe.load("digits-ra"), 0, 0, rank=0, world_size=2, batch_size=32)
    for row in (json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()):
        ds.set_epoch(row["epoch"])
        assert row["steps"] == ds.batches() and row["images"] == 2 * ds.views() == 2 * 32 * ds.batches()
    state = torch.load(reference / "train_state.pt", weights_only=True)
    assert state["schedule"]["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])  # drop path draws differ across ranks


def test_an_elastic_restart_resumes_to_the_uninterrupted_result(digits_dir, store, reference, tmp_path):
    out = tmp_path / "elastic"
    agent = start(torchrun("--standalone", "--nproc-per-node", 2, "--max-restarts", 1)
                  + ["train-student", "--out", out, "--manifest", digits_dir, "--cache", store, *STUDENT])
    kill_a_worker_when(agent, lambda: (out / "train_state.pt").exists())  # after epoch 0's checkpoint
    assert f"resuming {out} at epoch 1 of 2" in finish(agent)[0]  # the restarted group took its checkpoint
    assert sha256(out / "checkpoint.safetensors") == sha256(reference / "checkpoint.safetensors")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # each epoch's row once, from the checkpoint
    # a resume that would change the schedule is refused, naming what changed
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(ReplayKDError, match="would change the learning-rate schedule .*processes 2 then, 1 now"):
        train(StudentOptions.from_mapping({"out": unfinished, "manifest": digits_dir, "cache": store, "resume": True,
                                           **dict(zip([a[2:].replace("-", "_") for a in STUDENT[::2]],
                                                      STUDENT[1::2]))}))


def test_two_nodes_resume_when_only_one_nodes_worker_is_killed(digits_dir, store, reference, tmp_path):
    # the killed node restarts with TORCHELASTIC_RESTART_COUNT=1, the other with 0 (a membership change): the group
    # must still meet (it used to wait forever under keys named by each node's own count)
    out = tmp_path / "one-node"
    nodes = two_nodes(["train-student", "--out", out, "--manifest", digits_dir, "--cache", store, *STUDENT],
                      "--max-restarts", 1)
    kill_a_worker_when(nodes[1], lambda: (out / "train_state.pt").exists())  # after epoch 0's checkpoint
    outs = finish(*nodes, timeout=300)
    assert any(f"resuming {out} at epoch 1 of 2" in o for o in outs)
    assert sha256(out / "checkpoint.safetensors") == sha256(reference / "checkpoint.safetensors")


def test_ranks_resume_together_when_only_one_node_counts_a_restart(digits_dir, store, reference, tmp_path):
    # torchrun restarts the workers of a node whose worker did not fail as a membership change, which leaves its
    # TORCHELASTIC_RESTART_COUNT at 0 while the failed node's says 1: each rank deciding alone, one resumed and the
    # other refused the folder ("holds a run already"), and the group broke apart (issue 35: 1 run in 3 failed)
    out = tmp_path / "restarted"

    def ranks(counts: tuple[int, int], *extra) -> list[subprocess.Popen]:
        port = free_port()
        return [start([sys.executable, "-m", "replaykd", "train-student", "--out", out, "--manifest", digits_dir,
                       "--cache", store, *STUDENT, *extra],
                      env={"RANK": rank, "LOCAL_RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": port, "TORCHELASTIC_RESTART_COUNT": count})
                for rank, count in enumerate(counts)]

    finish(*ranks((0, 0), "--stop-after", 1))  # the first attempt, ended after epoch 0's checkpoint
    assert f"resuming {out} at epoch 1 of 2" in finish(*ranks((0, 1)), timeout=300)[0]
    assert sha256(out / "checkpoint.safetensors") == sha256(reference / "checkpoint.safetensors")


def test_stage_one_on_two_nodes_finishes_what_is_left_in_equal_shares(store, digits_dir, teacher_ckpt, tmp_path):
    # two thirds built (2 of 3 epochs, by one process); two "nodes" of one process each finish the third
    grown = tmp_path / "grown"
    shutil.copytree(store, grown)
    args = ["teacher-cache", "--manifest", digits_dir, "--checkpoint", teacher_ckpt, "--teacher", "regnety_002",
            "--out", grown, "--recipe", "digits-ra", "--epochs", "3", "--topk", "5", "--workers", "0", "--device",
            "cpu", "--batch-size", "64"]
    outs = finish(*two_nodes(args))
    cache = TeacherCache.open(grown)
    assert not cache.missing()
    # rank 0 prints the store as every rank left it, not as it stood when its own share was done
    assert "units missing 0," in "".join(outs), outs
    mine = [r for r in run_records(cache) if r["parts"] == 2]
    assert sorted(r["part"] for r in mine) == [0, 1]
    units = [cache.unit_size(2, s) for s in range(len(cache.shards))]
    shares = [r["share_views"] for r in mine]
    assert sum(shares) == sum(units) and max(shares) - min(shares) <= max(units)  # balanced by count
    assert sum(r["views_written"] for r in mine) == sum(units) and all(r["views_written"] > 0 for r in mine)
    fresh = tmp_path / "fresh"
    from replaykd.stages.teacher_cache import run as build

    build(options(digits_dir, teacher_ckpt, fresh, epochs=3))
    assert_same_arrays(arrays(grown), arrays(fresh))


def test_stage_one_resumes_by_itself_after_a_worker_is_killed(store, digits_dir, teacher_ckpt, tmp_path):
    out = tmp_path / "elastic"
    args = ["teacher-cache", "--manifest", digits_dir, "--checkpoint", teacher_ckpt, "--teacher", "regnety_002",
            "--out", out, "--recipe", "digits-ra", "--epochs", "2", "--topk", "5", "--workers", "0", "--device", "cpu",
            "--batch-size", "16"]
    agent = start(torchrun("--standalone", "--nproc-per-node", 2, "--max-restarts", 1) + args)
    kill_a_worker_when(agent, lambda: any((out / "units" / "c").glob("*/*")))
    finish(agent)
    assert not TeacherCache.open(out).missing()
    assert_same_arrays(arrays(out), arrays(store))
