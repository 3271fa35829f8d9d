"""Stage one on digits with a real (tiny) RegNetY teacher: round trip, resume, torchrun, identity checks."""
from __future__ import annotations

import json
import random
import shlex
import shutil
import tarfile
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import save_file

from replaykd import teacher as teachers
from replaykd.cache import CacheRequest, TeacherCache
from replaykd.errors import ReplayKDError
from replaykd.finish import Finisher
from replaykd.loader import ViewCollate
from replaykd.manifest import Manifest
from replaykd.models import create_classifier
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer
from replaykd.stages.teacher_cache import run
from tests.conftest import CLI, arrays, options, run_cli

pytestmark = pytest.mark.slow

ARRAYS = ("probs", "classes", "fingerprint")


def test_stored_targets_equal_a_fresh_teacher_forward(store, digits_dir, teacher_ckpt):
    cache = TeacherCache.open(store)
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    teacher = teachers.load("regnety_002", teacher_ckpt).wrap(recipe.mean, recipe.std)
    replayer = Replayer(recipe, 0)
    rng = np.random.default_rng(1)
    for _ in range(6):
        epoch, shard_no = int(rng.integers(2)), int(rng.integers(len(cache.shards)))
        records = read_shard(m, "train", cache.shards[shard_no])
        unit = cache.read_unit(epoch, shard_no)
        plan = replayer.plan(len(records), epoch, cache.shards[shard_no], shard_no)
        assert len(unit.fingerprint) == len(plan.slots)
        for slot in rng.integers(len(plan.slots), size=4):
            view = replayer.view_at(plan, records, int(slot))
            assert view.fingerprint == unit.fingerprint[slot]
            image = Finisher(recipe)(ViewCollate(10, recipe.smoothing)([view]), torch.device("cpu"))
            with torch.inference_mode():
                probs = teacher(image).softmax(-1)[0]
            top = probs.topk(5)
            assert np.array_equal(top.indices.numpy(), unit.classes[slot])
            assert np.allclose(top.values.numpy(), unit.probs[slot].astype(np.float32), atol=1e-3)
            assert np.all(np.diff(unit.probs[slot].astype(np.float32)) <= 0)  # sorted


def test_cache_info_and_verify(store, tmp_path, monkeypatch):
    import replaykd.stages.cache_tools

    info = run_cli("cache", "info", store, "--json")
    assert '"units_missing": 0' in info.stdout and '"topk": 5' in info.stdout
    reads = []
    read_shard = replaykd.stages.cache_tools.read_shard
    monkeypatch.setattr(replaykd.stages.cache_tools, "read_shard", lambda m, split, shard: reads.append(shard) or
                        read_shard(m, split, shard))
    ok = run_cli("cache", "verify", store, "--samples", "300", "--device", "cpu")
    assert "fingerprints OK" in ok.stdout and "verified " in ok.stdout
    assert len(reads) == len(set(reads)) == 8  # shard by shard: one shard's images in memory, whatever --samples
    # the teacher re-run agrees only to within float noise: an impossible --atol is a mismatch
    strict = run_cli("cache", "verify", store, "--samples", "8", "--device", "cpu", "--atol", "1e-12", check=False)
    assert strict.returncode == 1 and "teacher probabilities differ" in strict.stderr, strict.stderr
    # a store of other views: every fingerprint altered, as written (its completion records agree with it)
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(store), str(bad)], check=True)
    cache = TeacherCache.open(bad, mode="a")
    for e, s in zip(*cache.done().nonzero()):
        unit = cache.read_unit(e, s)
        unit.fingerprint ^= 1
        assert not cache.write_unit(e, s, unit)  # written once: a second write changes nothing
        cache.drop([(e, s, "edited")])
        assert cache.write_unit(e, s, unit)
    proc = run_cli("cache", "verify", bad, "--samples", "8", "--device", "cpu", check=False)
    assert proc.returncode == 1 and "fingerprint" in proc.stderr and "fingerprints: 8 of 8 mismatch" in proc.stdout


def test_other_recipe_seed_or_manifest_is_refused(store, digits_dir, teacher_ckpt, tmp_path):
    with pytest.raises(ReplayKDError, match="views: the store's recipe 'digits-ra' and this run's 'deit' differ"):
        run(options(digits_dir, teacher_ckpt, store, recipe="deit"))
    with pytest.raises(ReplayKDError, match="run_seed"):
        run(options(digits_dir, teacher_ckpt, store, seed=1))
    with pytest.raises(ReplayKDError, match="topk"):
        run(options(digits_dir, teacher_ckpt, store, topk=3))
    from replaykd.shards import write_shards
    from replaykd.sources import digits_source
    other = tmp_path / "other"
    write_shards(digits_source(0.2, seed=5, size=16), other, 200, 5, False)
    with pytest.raises(ReplayKDError, match="manifest: the store was built from"):
        run(options(other, teacher_ckpt, store))


def test_bad_inputs(digits_dir, teacher_ckpt, tmp_path):
    with pytest.raises(ReplayKDError, match="--topk"):
        run(options(digits_dir, teacher_ckpt, tmp_path / "a", topk=11))
    with pytest.raises(ReplayKDError, match="--topk must be at least 1"):
        options(digits_dir, teacher_ckpt, tmp_path / "a", topk=0)
    with pytest.raises(ReplayKDError, match="not found"):
        run(options(digits_dir, tmp_path / "missing.safetensors", tmp_path / "b"))
    five = tmp_path / "five.safetensors"
    save_file(create_classifier("regnety_002", 5).state_dict(), str(five))
    with pytest.raises(ReplayKDError, match="has 5 classes, the data set has 10: fine-tune .*train-teacher --init"):
        run(options(digits_dir, five, tmp_path / "c"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": create_classifier("regnety_004", 10).state_dict()}, wrong)
    with pytest.raises(ReplayKDError, match="missing keys|wrong shapes"):
        run(options(digits_dir, wrong, tmp_path / "d"))


def test_growing_appends_epochs(store, digits_dir, teacher_ckpt, tmp_path):
    grown = tmp_path / "grown"
    subprocess.run(["cp", "-r", str(store), str(grown)], check=True)
    before = arrays(grown)
    summary, mine = run(options(digits_dir, teacher_ckpt, grown, epochs=3))
    cache = TeacherCache.open(grown)
    new = sum(cache.unit_size(2, s) for s in range(len(cache.shards)))
    assert mine["views_written"] == new  # only the new epoch
    # cache info: the store's totals over both launches, and the last launch's own, labelled apart
    assert summary.totals["views_written"] == summary.views_cached and summary.totals["launches"] == 2
    assert summary.last_launch["views_written"] == new
    text = run_cli("cache", "info", grown).stdout
    assert f"store totals: {summary.views_cached} views written by 2 process(es) in 2 launch(es)" in text
    assert f"last launch: {new} views written by 1 process(es)" in text
    after = arrays(grown)
    for n in ARRAYS:
        assert np.array_equal(after[n][:2], before[n])
    fresh = tmp_path / "fresh"
    run(options(digits_dir, teacher_ckpt, fresh, epochs=3))
    for n in ARRAYS:
        assert np.array_equal(arrays(fresh)[n], after[n])


def test_kill_and_resume_gives_identical_arrays(store, digits_dir, teacher_ckpt, tmp_path):
    out = tmp_path / "killed"
    args = ["teacher-cache", "--manifest", digits_dir, "--checkpoint", teacher_ckpt, "--out", out, "--recipe", "digits-ra",
            "--teacher", "regnety_002", "--epochs", "2", "--topk", "5", "--workers", "0", "--batch-size", "16",
            "--device", "cpu"]
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any((out / "units" / "c").glob("*/*")):
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert TeacherCache.open(out).missing(), "the kill came after every unit was written"
    assert any(p.name.startswith("s") for p in (out / "claims").iterdir())  # the killed run's claim is still there
    run_cli(*args)  # and does not block the rerun: its process is gone
    assert not TeacherCache.open(out).missing()
    assert_same_arrays(arrays(out), arrays(store))


def test_two_runs_on_one_new_store_share_the_work(store, digits_dir, teacher_ckpt, tmp_path):
    out = tmp_path / "shared"
    args = ["teacher-cache", "--manifest", digits_dir, "--checkpoint", teacher_ckpt, "--out", out, "--recipe",
            "digits-ra", "--teacher", "regnety_002", "--epochs", "2", "--topk", "5", "--workers", "0", "--batch-size",
            "16", "--device", "cpu", "--json", "--threads", "1"]
    procs = [subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    written = [json.loads(stdout)["this_process"]["views_written"] for stdout, _ in results]
    cache = TeacherCache.open(out)
    assert sum(written) == sum(cache.unit_size(e, s) for e in range(2) for s in range(len(cache.shards)))  # no view twice
    assert_same_arrays(arrays(out), arrays(store))


def assert_same_arrays(got: dict, expected: dict) -> None:
    """Views exactly (their fingerprints); teacher outputs up to float noise of other batch shapes."""
    assert np.array_equal(got["fingerprint"], expected["fingerprint"])
    gp, ep = got["probs"].astype(np.float32), expected["probs"].astype(np.float32)
    assert np.allclose(gp, ep, atol=1e-3)
    # class order may only differ where two sorted probabilities are (nearly) tied
    differ = got["classes"] != expected["classes"]
    near_tie = np.zeros_like(differ)
    near_tie[..., 1:] |= np.abs(np.diff(ep, axis=-1)) < 2e-3
    near_tie[..., :-1] |= np.abs(np.diff(ep, axis=-1)) < 2e-3
    assert not (differ & ~near_tie).any()


def test_an_older_format_is_refused_with_rebuild(store, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(store, old)
    group = zarr.open_group(str(old), mode="a")
    group.attrs["format"] = "replaykd.teacher-cache/1"
    with pytest.raises(ReplayKDError, match="format 1.*Rebuild it"):
        TeacherCache.open(old)
    proc = run_cli("cache", "info", old, check=False)
    assert proc.returncode == 2 and "Rebuild it" in proc.stderr


def test_plain_zarr_opens_the_store_without_warnings(store):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(store), mode="r")
        members = sorted(name for name, _ in group.members(max_depth=None))
        assert [m for m in members if "/" not in m] == ["claims", "runs", "units"]
        # each building process's figures, and the claim records (given up, they stay: generations only grow)
        assert all(m.startswith(("runs/", "claims/")) for m in members if "/" in m)


def test_full_disk_is_a_clear_error_and_the_store_resumes(store, digits_dir, teacher_ckpt, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        with pytest.raises(ReplayKDError, match="disk is full.*rerun"):
            run(options(digits_dir, teacher_ckpt, mnt / "store"))
        partial = TeacherCache.open(mnt / "store")
        assert partial.missing()
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        run(options(digits_dir, teacher_ckpt, mnt / "store"))
        assert_same_arrays(arrays(mnt / "store"), arrays(store))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_damaged_bytes_are_named_repaired_and_rebuilt(store, digits_dir, teacher_ckpt, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    chunk = damaged / "units" / "c" / "3" / "0"  # epoch 0 of data shard 3
    data = bytearray(chunk.read_bytes())
    for i in range(40):  # 40 bytes of its compressed data
        data[len(data) // 8 + i] ^= 0x5A
    chunk.write_bytes(bytes(data))
    student = ["train-student", "--out", tmp_path / "run", "--manifest", digits_dir, "--cache", damaged, "--recipe",
               "digits-ra", "--epochs", "2", "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--num-heads",
               "2", "--batch-size", "64", "--workers", "0", "--device", "cpu"]
    proc = run_cli(*student, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "shard train-000003.tar) is damaged: its object units/c/3/0 fails its CRC-32C" in proc.stderr
    assert f"replaykd cache repair {damaged}" in proc.stderr and not (tmp_path / "run").exists()
    proc = run_cli("cache", "verify", damaged, "--full", "--samples", "0", check=False)
    assert proc.returncode == 1 and "damaged: unit (epoch 0, shard train-000003.tar): its object" in proc.stderr
    assert "1 damaged" in proc.stdout
    proc = run_cli("cache", "repair", damaged)
    assert "damaged: unit (epoch 0, shard train-000003.tar): its object units/c/3/0 fails" in proc.stdout
    assert "1 units are now missing" in proc.stdout and "replaykd teacher-cache " in proc.stdout
    assert TeacherCache.open(damaged).missing() == [(0, 3)]  # that unit only: each unit is its own object
    # units missing are not "all intact": each is named, and verify fails
    proc = run_cli("cache", "verify", damaged, "--full", "--samples", "0", check=False)
    assert proc.returncode == 1 and "all intact; 1 of 16 units missing" in proc.stdout, proc.stdout
    assert "missing: unit (epoch 0, shard train-000003.tar) is not in the store" in proc.stderr
    # the command repair printed rebuilds this store, a copy of the one built (its recorded --out is that one)
    command = shlex.split(proc_repair_command(run_cli("cache", "repair", damaged).stdout))
    assert command[:2] == ["replaykd", "teacher-cache"] and command[command.index("--out") + 1] == str(damaged)
    run_cli(*command[1:])
    assert not TeacherCache.open(damaged).missing()
    assert_same_arrays(arrays(damaged), arrays(store))
    assert "all intact" in run_cli("cache", "verify", damaged, "--full", "--samples", "4", "--device", "cpu").stdout


def proc_repair_command(out: str) -> str:
    """The rebuild command `cache repair` printed (the line after "Rebuild them with:")."""
    lines = out.splitlines()
    return lines[lines.index(next(x for x in lines if x.endswith("Rebuild them with:"))) + 1].strip()


@pytest.mark.parametrize("change, message", [
    ("missing", "train-000002.tar is missing"),
    ("truncated", "train-000002.tar holds"),
    ("changed", "image of key '.*' differs from the manifest"),
])
def test_a_bad_shard_leaves_no_half_made_store(digits_dir, teacher_ckpt, tmp_path, change, message):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shard = data / "train-000002.tar"
    if change == "missing":
        shard.unlink()
    elif change == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1024])
    else:  # the same size, one image's bytes changed: found only when the shard is read, after other units
        raw = bytearray(shard.read_bytes())
        raw[raw.rindex(b"IDAT") + 8] ^= 0xFF
        shard.write_bytes(bytes(raw))
    out = tmp_path / "store"
    with pytest.raises(ReplayKDError, match=message):
        run(options(data, teacher_ckpt, out, workers=0))
    if change != "changed":
        assert not out.exists()  # refused before the store was created
    else:  # found when the shard is read (shards are taken in order): the units finished before are kept
        missing = TeacherCache.open(out).missing()
        assert {(0, 2), (1, 2)} <= set(missing) and len(missing) < 16


def test_a_first_run_failing_on_its_last_shard_keeps_every_finished_unit(digits_dir, teacher_ckpt, tmp_path):
    # shards made elsewhere (listed by `replaykd manifest`, which reads no pixel) with an image that does not decode
    data = tmp_path / "data"
    data.mkdir()
    for f in digits_dir.iterdir():
        if f.suffix == ".tar" or f.name == "classes.txt":
            shutil.copy(f, data / f.name)
    last = data / "train-000007.tar"  # one participant takes the shards in order: this one last
    with tarfile.open(last) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    raw = bytearray(last.read_bytes())
    raw[member.offset_data:member.offset_data + member.size] = b"\0" * member.size
    last.write_bytes(bytes(raw))
    key = member.name.rsplit(".", 1)[0]
    # `replaykd manifest` decodes every image first and names the one that fails: it can still be left out there
    proc = run_cli("manifest", f"{data}/*.tar", tmp_path / "m", check=False)
    assert proc.returncode == 2 and f"1 images do not decode: train-000007.tar:{key} (" in proc.stderr, proc.stderr
    assert "--skip-bad" in proc.stderr and not (tmp_path / "m" / "manifest.json").exists()
    run_cli("manifest", f"{data}/*.tar", tmp_path / "m", "--no-decode-check")  # listed without reading a pixel
    out = tmp_path / "store"
    proc = run_cli("teacher-cache", "--manifest", tmp_path / "m", "--checkpoint", teacher_ckpt, "--teacher",
                   "regnety_002", "--recipe", "digits-ra", "--epochs", "2", "--topk", "5", "--workers", "1",
                   "--batch-size", "64", "--device", "cpu", "--out", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot decode image train-000007.tar:{key}" in proc.stderr
    missing = TeacherCache.open(out).missing()
    # units whose views were still on their way to the teacher when the error came are not finished
    assert {(0, 7), (1, 7)} <= set(missing) and len(missing) <= 4
    assert f"{out} keeps every unit finished so far ({16 - len(missing)} of 16)" in proc.stderr
    # and says what cannot go on: no rerun gets past an image its manifest records
    assert "but it can never be completed: its manifest records this image's bytes" in proc.stderr
    assert "replaykd shards SOURCE OUT --skip-bad" in proc.stderr and "Continue with" not in proc.stderr


def test_a_shard_too_small_to_give_a_view_in_some_epoch_leaves_a_complete_store(teacher_ckpt, tmp_path):
    # 33 digits in shards of 16 give 16/16/1: with 3 repeats and pairs the last shard's unit holds 2 views in one epoch
    # of each cycle and none in the other two, and those units stayed missing for ever ("units missing 2", and every
    # rerun the same): a unit of no view is complete by construction
    from replaykd.shards import write_shards
    from replaykd.sources import Source, digits_source

    digits = digits_source(0.2, seed=0, size=16)
    write_shards(Source("digits", digits.classes, {"train": digits.splits["train"][:33],
                                                   "val": digits.splits["val"][:40]}),
                 tmp_path / "data", shard_size=16, seed=0, skip_bad=False)
    assert Manifest.load(tmp_path / "data").shard_counts("train") == [16, 16, 1]
    summary, _ = run(options(tmp_path / "data", teacher_ckpt, tmp_path / "store", epochs=3))
    cache = TeacherCache.open(tmp_path / "store")
    assert summary.units_missing == 0 and not cache.missing()
    assert [cache.unit_size(e, 2) for e in range(3)] == [2, 0, 0] and cache.done().all()
    assert len(cache.read_unit(1, 2).fingerprint) == 0
    ok = run_cli("cache", "verify", tmp_path / "store", "--full", "--samples", "4", "--device", "cpu")
    assert "all intact" in ok.stdout, ok.stdout
    # stage two takes it: every unit complete
    cache.require(CacheRequest.of(Manifest.load(tmp_path / "data"), "train", Recipe.load("digits-ra"), 0), complete=True)


def test_a_store_of_pair_mixed_views_stays_what_it_is(digits_dir, teacher_ckpt, tmp_path):
    # every store built before recipes had mix_mode mixed each pair on its own draw: its recorded views name no
    # mix_mode, as a 'pair' recipe's views do now, so such a store trains a student that asks for 'pair' and is
    # refused, by name, to one that asks for 'group' (DeiT's recipes now)
    from replaykd import ReplayLoader

    pair = tmp_path / "digits-ra-pair.yaml"
    pair.write_text(yaml.safe_dump({**Recipe.load("digits-ra").as_dict(), "mix_mode": "pair"}))
    run(options(digits_dir, teacher_ckpt, tmp_path / "store", recipe=str(pair), epochs=1))
    cache = TeacherCache.open(tmp_path / "store")
    assert "mix_mode" not in cache.config.views and Recipe.load("digits-ra").views()["mix_mode"] == "group"
    loader = ReplayLoader(digits_dir, pair, tmp_path / "store", batch_size=64, workers=0, device="cpu")
    assert next(iter(loader)).teacher is not None  # every view's fingerprint checked against the store
    with pytest.raises(ReplayKDError, match=r"differ in mix_mode 'pair' vs 'group'"):
        ReplayLoader(digits_dir, "digits-ra", tmp_path / "store", batch_size=64, workers=0, device="cpu")
    verify = run_cli("cache", "verify", tmp_path / "store", "--samples", 16, "--device", "cpu")
    assert "fingerprints OK" in verify.stdout  # verify remakes the store's own pair views
