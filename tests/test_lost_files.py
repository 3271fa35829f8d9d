"""A completed unit whose data file is gone or short is refused by name (never read as zeros), found by verify and
repair, and rebuilt to the undamaged store's arrays: locally and on S3."""
from __future__ import annotations

import json
import shutil

import pytest
import s3fs

from replaykd import storage
from replaykd.cache import DamagedUnit, TeacherCache
from replaykd.stages.teacher_cache import run as build_cache
from tests.conftest import arrays, options, run_cli
from tests.test_teacher_cache import assert_same_arrays

LOST = "targets/c/0/3/0/0"  # epochs 0-1 of data shard 3 (two epochs per file)
UNIT = r"unit \(epoch 0, shard train-000003.tar\)"


def test_a_unit_whose_file_is_deleted_or_cut_is_refused_by_name(store, tmp_path):
    for damage in ("deleted", "cut"):
        copy = tmp_path / damage
        shutil.copytree(store, copy)
        f = copy / LOST
        f.unlink() if damage == "deleted" else f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        cache = TeacherCache.open(copy)
        why = "does not hold the data written for it: its file targets/c/0/3/0/0 is missing" \
            if damage == "deleted" else "fails its checksum in targets/c/0/3/0/0"
        with pytest.raises(DamagedUnit, match=f"{UNIT} is damaged: array 'targets' {why}"):
            cache.read_unit(0, 3)
        assert cache.read_unit(0, 2).fingerprint.all()  # the other units read as before
        assert sorted(cache.damage()) == [(0, 3, "targets"), (1, 3, "targets")]


@pytest.mark.slow
def test_a_lost_file_through_verify_training_repair_and_rebuild(store, digits_dir, teacher_ckpt, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / LOST).unlink()
    verify = run_cli("cache", "verify", copy, "--full", "--samples", "0", check=False)
    assert verify.returncode == 1 and "read every chunk" in verify.stdout and "2 damaged" in verify.stdout
    assert "unit (epoch 0, shard train-000003.tar) array 'targets'" in verify.stderr
    # replaying samples: each damaged unit is named once, however many of its views were picked
    verify = run_cli("cache", "verify", copy, "--samples", "400", "--device", "cpu", check=False)
    assert verify.returncode == 1 and verify.stderr.count("is damaged") == 2, verify.stderr
    assert "not (their units are damaged)" in verify.stdout and "fingerprints OK" in verify.stdout
    # stage two refuses the unit by name even with its fingerprint checks off (it used to train on class 0)
    train = run_cli("train-student", "--manifest", digits_dir, "--cache", copy, "--recipe", "digits-ra", "--epochs",
                    "1", "--patch-size", "4", "--depth", "1", "--embed-dim", "48", "--num-heads", "2", "--batch-size",
                    "64", "--workers", "0", "--device", "cpu", "--check-fingerprints", "off", "--eval-split", "none",
                    "--out", tmp_path / "run", check=False)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "unit (epoch 0, shard train-000003.tar) is damaged: array 'targets'" in train.stderr
    repair = run_cli("cache", "repair", copy)
    assert "dropped 1 Zarr shard file group(s)" in repair.stdout
    assert TeacherCache.open(copy).missing() == [(0, 3), (1, 3)]
    build_cache(options(digits_dir, teacher_ckpt, copy))
    assert not TeacherCache.open(copy).damage()
    assert_same_arrays(arrays(copy), arrays(store))


def test_a_repair_killed_midway_leaves_units_missing_never_complete_without_data(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / LOST).unlink()
    cache = TeacherCache.open(copy, mode="a")
    damaged = cache.damage()

    def killed(key):
        raise KeyboardInterrupt  # the repair is stopped at its first deletion

    cache.storage.delete = killed
    with pytest.raises(KeyboardInterrupt):
        cache.drop(damaged)
    again = TeacherCache.open(copy)
    assert again.missing() == [(0, 3), (1, 3)] and not again.damage()


@pytest.mark.slow
def test_a_lost_object_on_s3_is_refused_repaired_and_rebuilt(s3, store, digits_dir, teacher_ckpt):
    _, opts = s3
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(store), "bucket/lost.zarr", recursive=True)
    url = "s3://bucket/lost.zarr"
    fs.rm_file(f"bucket/lost.zarr/{LOST}")
    storage.configure(opts)
    with pytest.raises(DamagedUnit, match=f"{UNIT} is damaged: array 'targets' .* file {LOST} is missing"):
        TeacherCache.open(url).read_unit(0, 3)
    flag = ["--storage-options", json.dumps(opts)]
    repair = run_cli("cache", "repair", url, *flag)
    assert "dropped 1 Zarr shard file group(s)" in repair.stdout
    storage.configure(opts)
    assert TeacherCache.open(url).missing() == [(0, 3), (1, 3)]
    build_cache(options(digits_dir, teacher_ckpt, url, storage_options=opts))
    storage.configure(opts)
    assert_same_arrays(arrays(url), arrays(store))
