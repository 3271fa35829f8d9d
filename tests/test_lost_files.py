"""A unit whose object (or, packed, whose Zarr shard file) is gone or short is refused by name, never read as zeros,
found by verify, and rebuilt to the undamaged store's arrays: locally and on S3."""
from __future__ import annotations

import json
import shutil

import pytest
import s3fs

from replaykd import storage
from replaykd.cache import DamagedUnit, TeacherCache
from replaykd.errors import ReplayKDError
from replaykd.stages.teacher_cache import run as build_cache
from tests.conftest import arrays, options, run_cli
from tests.test_teacher_cache import assert_same_arrays

LOST = "units/c/3/0"  # epoch 0 of data shard 3
UNIT = r"unit \(epoch 0, shard train-000003.tar\)"


def _damaged_copies(store, tmp_path, key):
    """(how, a copy of `store` whose file `key` is deleted or cut to half), for each way."""
    for damage in ("deleted", "cut"):
        copy = tmp_path / damage
        shutil.copytree(store, copy)
        f = copy / key
        f.unlink() if damage == "deleted" else f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        yield damage, copy


def test_a_unit_whose_object_is_deleted_or_cut_is_refused_by_name(store, tmp_path):
    for damage, copy in _damaged_copies(store, tmp_path, LOST):
        cache = TeacherCache.open(copy)
        if damage == "deleted":
            assert cache.missing() == [(0, 3)] and not cache.damage()
            with pytest.raises(ReplayKDError, match=f"{UNIT} is not complete"):
                cache.read_unit(0, 3)
        else:
            assert not cache.missing()
            with pytest.raises(DamagedUnit, match=f"{UNIT} is damaged: its object {LOST} fails its CRC-32C"):
                cache.read_unit(0, 3)
            assert [(e, s) for e, s, _ in cache.damage()] == [(0, 3)]
        assert cache.read_unit(0, 2).fingerprint.all()  # the other units read as before


@pytest.mark.slow
def test_a_lost_object_through_verify_training_repair_and_rebuild(store, digits_dir, teacher_ckpt, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    (copy / LOST).unlink()
    verify = run_cli("cache", "verify", copy, "--full", "--samples", "0", check=False)
    assert verify.returncode == 1 and "read every unit" in verify.stdout and "1 of 16 units missing" in verify.stdout
    assert "missing: unit (epoch 0, shard train-000003.tar) is not in the store" in verify.stderr
    # stage two refuses the store by name even with its fingerprint checks off (it once trained on class 0)
    train = run_cli("train-student", "--manifest", digits_dir, "--cache", copy, "--recipe", "digits-ra", "--epochs",
                    "1", "--patch-size", "4", "--depth", "1", "--embed-dim", "48", "--num-heads", "2", "--batch-size",
                    "64", "--workers", "0", "--device", "cpu", "--check-fingerprints", "off", "--eval-split", "none",
                    "--out", tmp_path / "run", check=False)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "is incomplete: 1 units not done, e.g. (epoch 0, train-000003.tar)" in train.stderr
    repair = run_cli("cache", "repair", copy)
    assert "1 units are missing. Rebuild them with:" in repair.stdout
    build_cache(options(digits_dir, teacher_ckpt, copy))
    assert not TeacherCache.open(copy).damage()
    assert_same_arrays(arrays(copy), arrays(store))


def test_a_packed_store_with_a_lost_or_cut_file_is_refused_by_name(store, tmp_path):
    packed = tmp_path / "packed"
    run_cli("cache", "pack", store, packed, "--epochs-per-file", "2")
    assert_same_arrays(arrays(packed), arrays(store))
    shard_file = "targets/c/0/3/0/0"  # epochs 0-1 of data shard 3
    for damage, copy in _damaged_copies(packed, tmp_path, shard_file):
        cache = TeacherCache.open(copy)
        why = f"its file {shard_file} is missing" if damage == "deleted" else f"fails its checksum in {shard_file}"
        with pytest.raises(DamagedUnit, match=f"{UNIT} is damaged: .*{why}"):
            cache.read_unit(0, 3)
        assert cache.read_unit(0, 2).fingerprint.all()
        assert sorted((e, s) for e, s, _ in cache.damage()) == [(0, 3), (1, 3)]
        verify = run_cli("cache", "verify", copy, "--full", "--samples", "0", check=False)
        assert verify.returncode == 1 and "2 damaged" in verify.stdout, verify.stdout
        repair = run_cli("cache", "repair", copy, check=False)
        assert repair.returncode == 2 and "packed store: finished and read-only" in repair.stderr
    (tmp_path / "deleted" / "complete" / "c" / "0" / "3" / "0").unlink()  # and a lost completion record
    cache = TeacherCache.open(tmp_path / "deleted")
    assert (0, 3) in cache.missing() and (1, 3) in cache.missing()


@pytest.mark.slow
def test_a_lost_object_on_s3_is_refused_repaired_and_rebuilt(s3, store, digits_dir, teacher_ckpt):
    _, opts = s3
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(store), "bucket/lost.zarr", recursive=True)
    url = "s3://bucket/lost.zarr"
    fs.pipe_file(f"bucket/lost.zarr/{LOST}", fs.cat_file(f"bucket/lost.zarr/{LOST}")[:-9])
    fs.rm_file("bucket/lost.zarr/units/c/2/1")
    storage.configure(opts)
    with pytest.raises(DamagedUnit, match=f"{UNIT} is damaged: its object {LOST} fails its CRC-32C"):
        TeacherCache.open(url).read_unit(0, 3)
    flag = ["--storage-options", json.dumps(opts)]
    verify = run_cli("cache", "verify", url, "--full", "--samples", "0", *flag, check=False)
    assert verify.returncode == 1 and "1 damaged; 1 of 16 units missing" in verify.stdout, verify.stdout
    repair = run_cli("cache", "repair", url, *flag)
    assert "dropped 1 damaged unit(s)" in repair.stdout
    storage.configure(opts)
    assert TeacherCache.open(url).missing() == [(0, 3), (1, 2)]
    build_cache(options(digits_dir, teacher_ckpt, url, storage_options=opts))
    storage.configure(opts)
    assert_same_arrays(arrays(url), arrays(store))
