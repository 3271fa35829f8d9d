"""Format 8: each unit is one object, written once. A writer stalled past its lease changes nothing finished (locally
and on S3); a back-end that ignores create-only-if-absent is refused; unit objects are plain Zarr chunks; a format 7
store reads as it is and upgrades without the teacher to a store that trains the same students."""
from __future__ import annotations

import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import zarr
from safetensors.torch import load_file

from replaykd import storage
from replaykd.cache import ReadOnlyStore, TeacherCache
from replaykd.errors import ReplayKDError
from replaykd.manifest import Manifest
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer
from tests.conftest import CLI, arrays, run_cli
from tests.flaky_proxy import FlakyProxy
from tests.test_teacher_cache import assert_same_arrays

# Made at commit 13d3ddd (format 7) from 40 training and 16 validation digits at 16 px: `write_shards` with
# shard_size 16 and seed 0 into format7/data, `replaykd train-teacher --epochs 1` for a regnety_002, then
# `replaykd teacher-cache --recipe digits-ra --epochs 2 --topk 5 --seed 0 --epochs-per-file 2 --out
# format7/store.zarr`. The teacher is not kept: an upgrade never runs it.
FORMAT7 = Path(__file__).parent / "fixtures" / "format7.tar.gz"


def test_a_unit_object_is_a_zarr_chunk_that_plain_zarr_reads(store):
    cache = TeacherCache.open(store)
    units = zarr.open_array(str(store / "units"), mode="r")
    width = cache.slots * cache.columns
    for e, s in [(0, 0), (1, 3), (1, len(cache.shards) - 1)]:
        n = cache.unit_size(e, s)
        rows = np.asarray(units[s, e * width:(e + 1) * width]).reshape(cache.columns, cache.slots).T
        assert np.array_equal(rows[:n], cache.read_unit(e, s).packed(cache.config.num_classes))
        assert not rows[n:].any()


def _build_args(digits_dir, ckpt, out, *extra) -> list[str]:
    return ["teacher-cache", "--manifest", digits_dir, "--checkpoint", ckpt, "--out", out, "--recipe", "digits-ra",
            "--teacher", "regnety_002", "--epochs", "2", "--topk", "5", "--workers", "0", "--batch-size", "16",
            "--device", "cpu", "--lease", "2", *extra]


def _stalled_then_taken_over(digits_dir, ckpt, out, written, extra=()) -> subprocess.CompletedProcess:
    """Start a build, stop it (SIGSTOP) once it has written a unit, let another build take its shards after their
    lease and finish the store, then resume the first; its outcome."""
    stalled = subprocess.Popen([*CLI, *map(str, _build_args(digits_dir, ckpt, out, *extra))], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and written() == 0 and stalled.poll() is None:
            time.sleep(0.02)
        assert stalled.poll() is None and written() > 0, "the build ended before it could be stopped"
        stalled.send_signal(signal.SIGSTOP)
        time.sleep(3.0)  # past its 2 s lease: its claims are stale
        other = run_cli(*_build_args(digits_dir, ckpt, out, *extra))
        assert "units missing 0" in other.stdout, other.stdout
        stalled.send_signal(signal.SIGCONT)
        stdout, stderr = stalled.communicate(timeout=300)
    finally:
        stalled.kill()
    return subprocess.CompletedProcess(stalled.args, stalled.returncode, stdout, stderr)


def test_a_writer_stalled_past_its_lease_changes_no_finished_unit(store, digits_dir, teacher_ckpt, tmp_path):
    out = tmp_path / "stalled.zarr"
    proc = _stalled_then_taken_over(digits_dir, teacher_ckpt, out,
                                    lambda: len(list((out / "units" / "c").glob("*/*"))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "were written by another process first" in proc.stderr, proc.stderr[-3000:]
    cache = TeacherCache.open(out)
    assert not cache.missing() and not cache.damage()
    assert_same_arrays(arrays(out), arrays(store))


@pytest.mark.slow
def test_a_writer_stalled_past_its_lease_on_s3_changes_no_finished_unit(s3, store, digits_dir, teacher_ckpt):
    _, opts = s3
    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    url = "s3://bucket/stalled.zarr"

    def written() -> int:
        try:
            return len(fs.find("bucket/stalled.zarr/units/c"))
        except FileNotFoundError:
            return 0

    fs.invalidate_cache()
    proc = _stalled_then_taken_over(digits_dir, teacher_ckpt, url, written, ("--storage-options", json.dumps(opts)))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    storage.configure(opts)
    assert not TeacherCache.open(url).missing()
    assert_same_arrays(arrays(url), arrays(store))


def test_an_endpoint_that_ignores_if_none_match_is_refused_by_name(s3, digits_dir, teacher_ckpt):
    endpoint, opts = s3
    with FlakyProxy(endpoint, every=10 ** 9, ignore_conditions=True) as proxy:
        lax = {**opts, "endpoint_url": proxy.endpoint}
        storage.configure(lax)
        with pytest.raises(ReplayKDError, match="does not honour create-only-if-absent"):
            storage.for_root("s3://bucket/lax.zarr").require_atomic_create()
        proc = run_cli(*_build_args(digits_dir, teacher_ckpt, "s3://bucket/lax.zarr"), "--storage-options",
                       json.dumps(lax), check=False)
    assert proc.returncode == 2 and "does not honour create-only-if-absent" in proc.stderr, proc.stderr
    assert not s3fs.S3FileSystem(**opts, skip_instance_cache=True).find("bucket/lax.zarr")  # nothing left there
    storage.configure(opts)
    storage.for_root("s3://bucket/strict.zarr").require_atomic_create()  # the server itself honours it


@pytest.fixture
def format7(tmp_path) -> Path:
    with tarfile.open(FORMAT7) as t:
        t.extractall(tmp_path, filter="data")
    return tmp_path / "format7"


def _student(data: Path, cache: Path, out: Path) -> None:
    run_cli("train-student", "--manifest", data, "--cache", cache, "--recipe", "digits-ra", "--epochs", "2",
            "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "16",
            "--workers", "0", "--device", "cpu", "--threads", "1", "--eval-split", "none", "--log-interval", "1",
            "--out", out)


def test_a_format_7_store_reads_as_it_is_and_upgrades_to_one_that_trains_the_same(format7, tmp_path):
    old = TeacherCache.open(format7 / "store.zarr")
    assert old.version == 7 and not old.writable and not old.missing()
    with pytest.raises(ReadOnlyStore, match="cache upgrade"):
        old.write_unit(0, 0, old.read_unit(0, 0))
    new = tmp_path / "new.zarr"
    units = int(old.recorded().sum())
    proc = run_cli("cache", "upgrade", old.path, new)
    assert f"{units} units copied" in proc.stdout, proc.stdout
    up = TeacherCache.open(new)
    assert up.version == 8 and up.writable and up.config == old.config and not up.missing()
    for e, s in zip(*old.done().nonzero()):
        a, b = old.read_unit(e, s), up.read_unit(e, s)
        assert all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))
    # its views are the ones a fresh build makes now: every fingerprint equals a replay's
    manifest, recipe = Manifest.load(format7 / "data"), Recipe.load("digits-ra")
    replayer = Replayer(recipe, up.config.run_seed)
    for s, shard in enumerate(up.shards):
        records = read_shard(manifest, "train", shard)
        for e in range(up.config.epochs):
            plan = replayer.plan(len(records), e, shard, s)
            stored = up.read_unit(e, s).fingerprint
            assert [replayer.view_at(plan, records, i).fingerprint for i in range(len(stored))] == stored.tolist()
    # a student trains exactly the same from either
    _student(format7 / "data", old.path, tmp_path / "from7")
    _student(format7 / "data", new, tmp_path / "from8")
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("from7", "from8")]
    losses = [[json.loads(x).get("loss") for x in log] for log in logs]
    assert losses[0] == losses[1] and any(v is not None for v in losses[0])
    a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("from7", "from8"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # run again, it copies nothing more; packing the new store and unpacking that gives the same units back
    assert f"0 units copied, {units} there already" in run_cli("cache", "upgrade", old.path, new).stdout
    run_cli("cache", "pack", new, tmp_path / "packed")
    run_cli("cache", "upgrade", tmp_path / "packed", tmp_path / "unpacked")
    for name, values in arrays(tmp_path / "unpacked").items():
        assert np.array_equal(values, arrays(new)[name]), name
    info = run_cli("cache", "info", tmp_path / "packed").stdout
    assert "packed" in info and "files" in info


def test_pack_refuses_an_unfinished_store_and_an_existing_folder(store, tmp_path):
    partial = tmp_path / "partial"
    import shutil

    shutil.copytree(store, partial)
    (partial / "units" / "c" / "2" / "1").unlink()
    proc = run_cli("cache", "pack", partial, tmp_path / "p", check=False)
    assert proc.returncode == 2 and "is not finished (1 units missing, e.g. (epoch 1, train-000002.tar))" in proc.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    proc = run_cli("cache", "pack", store, tmp_path / "taken", check=False)
    assert proc.returncode == 2 and "exists; give a new folder" in proc.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
