"""Stage two on digits: training from the cache, cache == online teacher, refusals, resume, torchrun."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from replaykd import teacher as teachers
from replaykd import threads
from replaykd.cache import TeacherCache
from replaykd.errors import ReplayKDError, ShardMismatch
from replaykd.finish import Finisher
from replaykd.loader import ReplayViews, ViewCollate
from replaykd.losses import DistillationLoss
from replaykd.manifest import Manifest
from replaykd.recipe import Recipe
from replaykd.records import TeacherTargets
from replaykd.targets import CachedTargets
from replaykd.threads import cores
from replaykd.stages.options import StudentOptions
from replaykd.stages.train_student import run

pytestmark = pytest.mark.slow

TINY = dict(recipe="digits-ra", student="deit_tiny_distilled_patch16_224", patch_size=4, depth=2, embed_dim=48,
            num_heads=2, batch_size=64, lr=8e-3, warmup_epochs=1, workers=0, device="cpu", shuffle_buffer=256,
            threads=1)  # the student's numbers follow its thread count: one, whatever else runs


def opts(digits_dir, out, **kw) -> StudentOptions:
    """train-student options for the digits tests, checked as the command line's are."""
    return StudentOptions.from_mapping(dict(out=out, manifest=digits_dir, **{**TINY, **kw}))


def test_short_run_from_the_cache_learns(digits_dir, teacher_ckpt, tmp_path):
    # DeiT's full recipe needs tens of epochs on digits; the teacher's milder recipe shows learning in three
    from replaykd.stages.teacher_cache import run as build_cache
    from tests.conftest import options

    store = tmp_path / "mild"
    build_cache(options(digits_dir, teacher_ckpt, store, recipe="digits-teacher", epochs=3))
    s = run(opts(digits_dir, tmp_path / "run", cache=store, recipe="digits-teacher", epochs=3, lr=1e-2))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) for r in log)
    assert all(0 < r["train_cpu_seconds"] < 3 * r["train_seconds"] for r in log)  # one thread, no workers
    assert log[-1]["loss"] < log[0]["loss"]
    assert s["source"] == "cache" and max(s["cls_top1"], s["dist_top1"], s["top1"]) > 14.0  # chance: 10.3%
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_cached_targets_equal_the_online_teacher(digits_dir, store, teacher_ckpt):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    cache = TeacherCache.open(store)
    source = CachedTargets(store)
    ds = ReplayViews(m, recipe, 0, 1, rank=0, world_size=1, annotate=source.annotator())
    items = [it for _, it in zip(range(96), ds)]
    batch = ViewCollate(10, recipe.smoothing)(items)
    views = Finisher(recipe)(batch, torch.device("cpu"))
    cached = source(batch, views)
    teacher = teachers.load("regnety_002", teacher_ckpt).wrap(recipe.mean, recipe.std)
    with torch.no_grad():
        online = TeacherTargets.from_logits(teacher(views), cache.config.topk)
    assert torch.equal(online.classes, cached.classes.long())
    assert torch.allclose(online.probs.float(), cached.probs.float(), atol=1e-3)
    outputs = (torch.randn(96, 10), torch.randn(96, 10))
    for mode in ("hard", "soft"):
        loss = DistillationLoss(mode, 0.5, 2.0, 10)
        assert torch.allclose(loss(outputs, batch.targets, cached).loss, loss(outputs, batch.targets, online).loss, atol=1e-3)


def test_mismatched_stores_are_refused(digits_dir, store, tmp_path):
    with pytest.raises(ReplayKDError, match=r"views: the store's recipe 'digits-ra' and this run's 'deit' differ in .*input_size 16 vs 224"):
        run(opts(digits_dir, tmp_path / "a", cache=store, epochs=1, recipe="deit"))
    with pytest.raises(ReplayKDError, match="run seed"):
        run(opts(digits_dir, tmp_path / "b", cache=store, epochs=1, seed=3))
    with pytest.raises(ReplayKDError, match="--reuse-epochs"):
        run(opts(digits_dir, tmp_path / "c", cache=store, epochs=5))
    with pytest.raises(ReplayKDError, match="exactly one"):
        opts(digits_dir, tmp_path / "d", epochs=1)
    assert not any((tmp_path / d).exists() for d in "abcd")  # refused before anything is written


def test_tampered_views_fail_the_fingerprint_check(digits_dir, store, tmp_path):
    m = Manifest.load(digits_dir)
    # the augmentation changed under the cache (as a new library version would): named by key
    changed = dataclasses.replace(Recipe.load("digits-ra"), mean=(0.5, 0.5, 0.5))
    ds = ReplayViews(m, changed, 0, 0, rank=0, world_size=1, annotate=CachedTargets(store).annotator())
    with pytest.raises(ReplayKDError, match=r"view of key '.+' \(epoch 0, shard train-0000\d\d.tar, repeat \d\).*fingerprint"):
        next(iter(ds))
    # a changed shard: named by shard and key before any view is made
    shard_dir = tmp_path / "shards"
    shutil.copytree(digits_dir, shard_dir)
    first = m.shards("train")[ReplayViews(m, Recipe.load("digits-ra"), 0, 0, rank=0, world_size=1).plan().order[0]]
    path = shard_dir / first
    data = bytearray(path.read_bytes())
    data[data.index(b"IDAT") + 8] ^= 0xFF  # inside the first image's compressed pixels
    path.write_bytes(bytes(data))
    moved = Manifest.load(digits_dir, shard_root=shard_dir)
    with pytest.raises(ShardMismatch, match=first):
        next(iter(ReplayViews(moved, Recipe.load("digits-ra"), 0, 0, rank=0, world_size=1,
                              annotate=CachedTargets(store).annotator())))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_uninterrupted_result(digits_dir, store, tmp_path, workers):
    # with loader workers too (their cache reads included): starting them must not draw from the generators a
    # resume restores, so the resumed run continues bit for bit
    kw = dict(cache=store, epochs=2, workers=workers, drop_path=0.2)
    run(opts(digits_dir, tmp_path / "full", **kw))
    stopped = run(opts(digits_dir, tmp_path / "part", stop_after=1, **kw))
    assert stopped == {"stopped_after": 1}
    with pytest.raises(ReplayKDError, match="different plan"):
        run(opts(digits_dir, tmp_path / "part", resume=True, **{**kw, "lr": 1e-3}))
    run(opts(digits_dir, tmp_path / "part", resume=True, **kw))
    a = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("full", "part")]
    strip = [[{k: v for k, v in json.loads(r).items() if "seconds" not in k and "per_s" not in k} for r in x] for x in rows]
    assert strip[0] == strip[1] and len(strip[0]) == 2


@pytest.mark.skipif(cores() < 2, reason="one core: every share is one thread")
def test_a_resumed_run_keeps_its_thread_count_whatever_else_runs(digits_dir, store, tmp_path, monkeypatch):
    # by default a run takes its share of the cores, so a run resumed beside another replaykd process took half as
    # many threads as it had, and a CPU run's sums (and so its weights) followed
    seats = tmp_path / f"replaykd-{os.getuid()}" / "compute"
    monkeypatch.setattr(threads, "seats_folder", lambda: seats)
    kw = dict(cache=store, epochs=2, depth=1, embed_dim=32, threads=None)
    run(opts(digits_dir, tmp_path / "full", **kw))
    assert run(opts(digits_dir, tmp_path / "part", stop_after=1, **kw)) == {"stopped_after": 1}
    other = subprocess.Popen([sys.executable, "-c", "import sys; from replaykd.threads import share; "
                              "print(share(None), flush=True); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path), "LOCAL_WORLD_SIZE": "1"})
    try:
        assert int(other.stdout.readline()) >= 1  # it holds its seat beside the resumed run
        run(opts(digits_dir, tmp_path / "part", resume=True, **kw))
    finally:
        other.kill()
        other.wait()
    rows = [[json.loads(r) for r in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("full", "part")]
    assert [r["threads"] for r in rows[0]] == [r["threads"] for r in rows[1]] == [cores(), cores()]
    assert [r["step_losses"] for r in rows[0]] == [r["step_losses"] for r in rows[1]]
    a, b = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_from_before_an_option_resumes_with_that_options_default(digits_dir, store, tmp_path):
    # soft_scale, keep_distillation_token and cache_weights came later: a config.yaml without them read as None
    # and every such run was refused on --resume
    kw = dict(cache=store, epochs=2, depth=1, embed_dim=32)
    assert run(opts(digits_dir, tmp_path / "run", stop_after=1, **kw)) == {"stopped_after": 1}
    config = tmp_path / "run" / "config.yaml"
    older = {k: v for k, v in yaml.safe_load(config.read_text()).items()
             if k not in ("soft_scale", "keep_distillation_token", "cache_weights", "log_interval")}
    config.write_text(yaml.safe_dump(older, sort_keys=False))
    assert run(opts(digits_dir, tmp_path / "run", resume=True, **kw))["epochs"] == 2
    # a run from before its views were recorded (and before mix_mode) is refused, not continued on other views
    older = tmp_path / "older"
    shutil.copytree(tmp_path / "run", older)
    (older / "summary.json").unlink()
    state = torch.load(older / "train_state.pt", weights_only=True)
    del state["schedule"]["views_hash"]
    torch.save(state, older / "train_state.pt")
    with pytest.raises(ReplayKDError, match=r"would replay other views than it was trained on: the recipe 'digits-ra'"):
        run(opts(digits_dir, older, resume=True, **kw))
    # an option the config does not name compares as its default: a change is still refused by name
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    (tmp_path / "other" / "summary.json").unlink()
    with pytest.raises(ReplayKDError, match=r"different plan .*soft_scale \('deit' then, 'batchmean' now\)"):
        run(opts(digits_dir, tmp_path / "other", resume=True, distillation="soft", soft_scale="batchmean", **kw))


def test_resume_refuses_other_loader_options(digits_dir, tmp_path):
    # they decide which views share a batch: a resume with others would not reproduce the uninterrupted run
    kw = dict(distillation="none", epochs=2, depth=1, embed_dim=32)
    assert run(opts(digits_dir, tmp_path / "run", stop_after=1, **kw)) == {"stopped_after": 1}
    with pytest.raises(ReplayKDError, match=r"--workers 0 then, 2 now\): they decide which views share a batch, so "
                                            r"the resumed run would not reproduce the uninterrupted one; resume with "
                                            r"the old values \(--workers 0\)"):
        run(opts(digits_dir, tmp_path / "run", resume=True, workers=2, **kw))
    with pytest.raises(ReplayKDError, match=r"\(--shuffle-buffer 256 then, unset now, --decode-memory 96 then, 64 now\)"
                                            r".* \(--shuffle-buffer 256 --decode-memory 96\)"):
        run(opts(digits_dir, tmp_path / "run", resume=True, shuffle_buffer=None, decode_memory=64, **kw))


def test_labels_only_keeps_the_distilled_deit_when_asked(digits_dir, tmp_path):
    # the same model as a KD run, both heads on the labels: the bench's like-for-like reference for the cache's cost
    kw = dict(distillation="none", epochs=1, depth=1, embed_dim=32)
    s = run(opts(digits_dir, tmp_path / "kept", keep_distillation_token=True, **kw))
    assert s["student"] == "deit_tiny_distilled_patch16_224" and s["source"] == "labels"
    assert {"cls_top1", "dist_top1"} <= set(s) and s["loss_distill"] > 0  # the distillation head learns the labels
    weights = load_file(str(tmp_path / "kept" / "checkpoint.safetensors"))
    assert "dist_token" in weights and "head_dist.weight" in weights
    assert run(opts(digits_dir, tmp_path / "swapped", **kw))["student"] == "deit_tiny_patch16_224"  # DeiT's baseline


def test_incomplete_store_lists_missing_units(digits_dir, store, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(store, partial)
    shutil.rmtree(partial / "units" / "c" / "3")  # both epochs of data shard 3
    with pytest.raises(ReplayKDError, match=r"incomplete: 2 units not done, e.g. \(epoch 0, train-000003.tar\)"):
        run(opts(digits_dir, tmp_path / "run", cache=partial, epochs=2))


def test_reuse_epochs_cycles_the_cached_epochs(digits_dir, store, tmp_path):
    run(opts(digits_dir, tmp_path / "run", cache=store, epochs=3, reuse_epochs=True, depth=1, embed_dim=32))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["view_epoch"] for r in log] == [0, 1, 0]


def test_cached_and_online_kd_give_identical_logs_with_repeats(digits_dir, store, teacher_ckpt, tmp_path):
    assert Recipe.load("digits-ra").repeats == 3
    run(opts(digits_dir, tmp_path / "cached", cache=store, epochs=2))
    run(opts(digits_dir, tmp_path / "online", online_teacher="regnety_002", teacher_checkpoint=teacher_ckpt,
             topk=5, epochs=2))

    def rows(name):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_s" not in k}
                for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    assert rows("cached") == rows("online")
    a = load_file(str(tmp_path / "cached" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "online" / "checkpoint.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_store_serves_students_that_change_only_their_own_fields(digits_dir, store, tmp_path):
    import yaml

    from replaykd.recipe import RECIPE_DIR

    base = yaml.safe_load((RECIPE_DIR / "digits-ra.yaml").read_text())
    own = tmp_path / "own.yaml"  # label smoothing and the eval crop change neither the views nor the teacher's input
    own.write_text(yaml.safe_dump({**base, "smoothing": 0.0, "eval_crop_pct": 1.0}))
    s = run(opts(digits_dir, tmp_path / "own", cache=store, recipe=str(own), epochs=1, depth=1, embed_dim=32))
    assert s["epochs"] == 1
    views = tmp_path / "views.yaml"
    views.write_text(yaml.safe_dump({**base, "re_prob": 0.5}))
    with pytest.raises(ReplayKDError, match=r"views: the store's recipe 'digits-ra' and this run's 'views' differ in "
                                            r"re_prob 0.25 vs 0.5"):
        run(opts(digits_dir, tmp_path / "views", cache=store, recipe=str(views), epochs=1))


def test_a_checkpoint_of_another_kind_of_device_leaves_drop_path_its_fresh_seed():
    from replaykd import rng

    generator = rng.rank_generator(3, 0, torch.device("cpu"))
    fresh = generator.get_state()
    assert not rng.restore([{"cuda": torch.zeros(16, dtype=torch.uint8)}], 0, generator)  # was a KeyError
    assert torch.equal(generator.get_state(), fresh)
    saved = rng.all_states(torch.Generator().manual_seed(9))
    assert rng.restore(saved, 0, generator) and torch.equal(generator.get_state(), saved[0]["cpu"])
