"""Several teachers, one set of views: students from combined caches equal the online ensemble, a cache that holds
other views is refused by name, weights are checked, one cache keeps its numbers, and `cache info A B` compares."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load_file

from replaykd.cache import TeacherCache
from replaykd.errors import ReplayKDError
from replaykd.export import Preprocessing, export
from replaykd.loader import ReplayViews, ViewCollate
from replaykd.losses import dense_target, ensemble_dense, top_class
from replaykd.manifest import Manifest
from replaykd.models import create_classifier, file_sha256
from replaykd.recipe import Recipe
from replaykd.records import TeacherEnsemble, TeacherTargets
from replaykd.targets import CachedTargets
from replaykd.stages.options import StudentOptions
from replaykd.stages.teacher_cache import run as build_cache
from replaykd.stages.train_student import replay_loader, run
from tests.conftest import options, run_cli

pytestmark = pytest.mark.slow

# The students of tests/test_train_student.py, one epoch: a distilled DeiT and a one-head CNN. One compute thread:
# runs compared number for number must not take their thread count from how busy the machine is when they start.
TINY = dict(recipe="digits-ra", batch_size=64, lr=8e-3, warmup_epochs=1, workers=0, device="cpu",
            shuffle_buffer=256, epochs=1, threads=1)
DEIT = dict(student="deit_tiny_distilled_patch16_224", patch_size=4, depth=2, embed_dim=48, num_heads=2)
ONE_HEAD = dict(student="test_resnet")
WEIGHTS = "0.6,0.4"


def opts(digits_dir, out, **kw) -> StudentOptions:
    """train-student options for these tests, checked as the command line's are."""
    return StudentOptions.from_mapping(dict(out=out, manifest=digits_dir, **{**TINY, **kw}))


def rows(run_dir) -> list[dict]:
    """A run's log without its timings."""
    return [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_s" not in k}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory):
    """A teacher of another architecture (timm's test_resnet, random weights) as a file with replaykd's JSON."""
    ckpt = tmp_path_factory.mktemp("teacher-b") / "test_resnet.safetensors"
    torch.manual_seed(7)
    model = create_classifier("test_resnet", 10)
    recipe = Recipe.load("digits-ra")
    export(model, ckpt, "test_resnet", {}, [str(i) for i in range(10)],
           Preprocessing(recipe.mean, recipe.std, 32, "bicubic"))
    return ckpt


@pytest.fixture(scope="module")
def second_store(tmp_path_factory, digits_dir, second_teacher):
    """A cache added later: the same manifest, recipe and seed as `store`, another teacher, k and epoch count."""
    out = tmp_path_factory.mktemp("cache-b") / "store"
    build_cache(options(digits_dir, second_teacher, out, teacher="test_resnet", topk=3, epochs=3))
    return out


def test_the_ensemble_is_the_weighted_mean_and_its_ties_go_to_the_lowest_class():
    a = TeacherTargets(torch.tensor([[0.5, 0.25]]).half(), torch.tensor([[3, 1]]))
    b = TeacherTargets(torch.tensor([[0.5, 0.3, 0.1]]).half(), torch.tensor([[1, 3, 0]]))
    mean = ensemble_dense(TeacherEnsemble((a, b), (0.25, 0.75)), 5)
    expected = 0.25 * dense_target(a.probs, a.classes, 5) + 0.75 * dense_target(b.probs, b.classes, 5)
    assert torch.equal(mean, expected) and torch.allclose(mean.sum(-1), torch.ones(1))
    # equal weights: classes 1 and 3 tie at 0.375; the lowest index wins, whatever order the maxima come in
    tie = ensemble_dense(TeacherEnsemble((a, TeacherTargets(torch.tensor([[0.5, 0.25]]).half(),
                                                            torch.tensor([[1, 3]]))), (0.5, 0.5)), 5)
    assert tie[0, 1] == tie[0, 3] == tie.max() and top_class(tie).tolist() == [1]
    rows_ = torch.tensor([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert top_class(rows_).tolist() == [1, 0, 0] and top_class(rows_.flip(-1)).tolist() == [0, 3, 0]


@pytest.mark.parametrize("mode, student", [("hard", DEIT), ("soft", ONE_HEAD)], ids=["hard-deit", "soft-one-head"])
def test_cached_ensemble_equals_the_online_ensemble(digits_dir, store, second_store, teacher_ckpt, second_teacher,
                                                    tmp_path, mode, student):
    kw = dict(distillation=mode, cache_weights=WEIGHTS, **student, **({"tau": 2.0} if mode == "soft" else {}))
    cached = run(opts(digits_dir, tmp_path / "cached", cache=[store, second_store], **kw))
    online = run(opts(digits_dir, tmp_path / "online", online_teacher=["regnety_002", "test_resnet"],
                      teacher_checkpoint=[teacher_ckpt, second_teacher], topk=[5, 3], **kw))
    assert rows(tmp_path / "cached") == rows(tmp_path / "online")
    a = load_file(str(tmp_path / "cached" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "online" / "checkpoint.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every teacher named, in order, with its file, weights' sha256, k and weight (and, cached, its store)
    names = [(t["name"], t["sha256"], t["topk"], t["weight"]) for t in cached["teachers"]]
    assert names == [("regnety_002", file_sha256(teacher_ckpt), 5, 0.6), ("test_resnet", file_sha256(second_teacher),
                                                                          3, 0.4)]
    assert [t["cache"] for t in cached["teachers"]] == [str(store), str(second_store)]
    assert [t["file"] for t in cached["teachers"]] == [t["file"] for t in online["teachers"]] == \
        [str(teacher_ckpt.resolve()), str(second_teacher.resolve())]
    assert json.loads((tmp_path / "cached" / "checkpoint.json").read_text())["teachers"] == cached["teachers"]
    config = yaml.safe_load((tmp_path / "cached" / "config.yaml").read_text())
    assert config["cache"] == [str(store), str(second_store)] and config["cache_weights"] == [0.6, 0.4]


def test_one_cache_keeps_its_numbers(digits_dir, store, second_store, tmp_path):
    # a single --cache reads as before (one teacher's targets, not an ensemble of one), and the ensemble that gives
    # another cache no weight is that cache alone, number for number
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    sources = [CachedTargets(store), CachedTargets(second_store), CachedTargets([store, second_store], "all", (.6, .4))]
    batches = [ViewCollate(10, recipe.smoothing)([v for _, v in zip(range(32), ReplayViews(
        m, recipe, 0, 0, rank=0, world_size=1, annotate=source.annotator()))]) for source in sources]
    a, b, both = (source(batch, torch.zeros(1)) for source, batch in zip(sources, batches))
    assert isinstance(a, TeacherTargets) and isinstance(both, TeacherEnsemble) and both.weights == (.6, .4)
    assert [(torch.equal(x.probs, y.probs), torch.equal(x.classes, y.classes)) for x, y in zip(both.members, (a, b))] \
        == [(True, True)] * 2 and both.members[1].probs.shape == (32, 3)
    kw = dict(distillation="soft", tau=2.0, **ONE_HEAD)
    single = run(opts(digits_dir, tmp_path / "single", cache=store, **kw))
    run(opts(digits_dir, tmp_path / "pair", cache=[store, second_store], cache_weights="1,0", **kw))
    assert rows(tmp_path / "single") == rows(tmp_path / "pair")
    assert yaml.safe_load((tmp_path / "single" / "config.yaml").read_text())["cache"] == str(store)  # as before
    assert [t["weight"] for t in single["teachers"]] == [1.0]


def _edited(store, out, **config) -> str:
    """A copy of `store` whose recorded config says other views were made (as a store built so would say)."""
    shutil.copytree(store, out)
    group = zarr.open_group(str(out), mode="a")
    group.attrs["config"] = {**group.attrs["config"], **config}
    return str(out)


@pytest.fixture(scope="module")
def other_recipe_store(tmp_path_factory, digits_dir, second_teacher):
    """A real cache of other views: the digits recipe (one repeat) instead of digits-ra."""
    out = tmp_path_factory.mktemp("cache-recipe") / "store"
    build_cache(options(digits_dir, second_teacher, out, teacher="test_resnet", topk=3, epochs=1, recipe="digits"))
    return out


@pytest.mark.parametrize("case, config, message", [
    ("recipe", None, r"views: the store's recipe 'digits' and this run's 'digits-ra' differ in .*repeats 1 vs 3"),
    ("seed", {"run_seed": 1}, r"run seed \(run_seed\): 1 in the store, 0 in this run"),
    ("classes", {"num_classes": 11}, r"classes \(num_classes\): 11 in the store, 10 in this run"),
    ("split", {"split": "val"}, r"split \(split\): 'val' in the store, 'train' in this run"),
    ("manifest", {"manifest_hash": "0" * 64}, r"manifest: the store was built from 0000000000000000"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_a_cache_of_other_views_is_refused_by_name(digits_dir, store, other_recipe_store, tmp_path, case, config,
                                                   message):
    other = str(other_recipe_store) if config is None else _edited(store, tmp_path / case, **config)
    with pytest.raises(ReplayKDError, match=rf"^{re.escape(other)} was built for something else; refusing to mix: "
                                            + message):
        run(opts(digits_dir, tmp_path / "run", cache=[store, other], **DEIT))
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("args, message", [
    (["--cache-weights", "0.5,0.4"], "--cache-weights 0.5,0.4 sum to 0.9, not 1"),
    (["--cache-weights", "0.2,0.3,0.5"], "--cache-weights 0.2,0.3,0.5 has 3 values for 2 teachers (--cache given 2 "
                                         "times): one per teacher, in order"),
    (["--cache-weights", "1.5,-0.5"], "--cache-weights must be at least 0.0, got -0.5"),
    (["--cache-weights", "0.5,x"], "--cache-weights must be float, got 'x'"),
    (["--online-teacher", "regnety_002"], "give exactly one of --cache (stage two) and --online-teacher"),
    (["--cache", "./A"], "is given more than once: each --cache is one teacher of the ensemble"),  # it was taken
], ids=["sum", "count", "negative", "not-a-number", "cached-and-online", "twice"])
def test_weights_that_do_not_fit_the_caches_are_refused(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli("train-student", "--out", out, "--cache", "A", "--cache", "B", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = run_cli("train-student", "--out", out, "--cache", "A", "--cache-weights", "1", check=False)
    assert proc.returncode == 2 and "--cache-weights weighs several teachers" in proc.stderr, proc.stderr
    proc = run_cli("train-student", "--out", out, "--online-teacher", "a", "--online-teacher", "b", "--topk", "3",
                   "--topk", "3", "--topk", "3", check=False)
    assert proc.returncode == 2 and "--topk has 3 values for 2 online teachers" in proc.stderr, proc.stderr
    assert not out.exists()


def test_the_run_uses_the_epochs_all_caches_hold_and_checks_every_fingerprint(digits_dir, store, second_store,
                                                                             tmp_path):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    assert TeacherCache.open(second_store).config.epochs == 3
    with pytest.raises(ReplayKDError, match=rf"3 epochs asked for but {store} holds 2 \(a run uses the epochs all its "
                                            r"caches hold\)"):
        run(opts(digits_dir, tmp_path / "run", cache=[second_store, store], epochs=3, **DEIT))
    o = opts(digits_dir, tmp_path / "run", cache=[second_store, store], epochs=3, reuse_epochs=True, **DEIT)
    assert replay_loader(o, m, recipe, torch.device("cpu"), 0, 1, None).view_epochs == 2  # --reuse-epochs cycles those
    # a cache whose views differ from the replayed ones (its fingerprints of epoch 0) is named, whichever it is
    tampered = tmp_path / "tampered"
    shutil.copytree(second_store, tampered)
    cache = TeacherCache.open(tampered, mode="a")
    for shard_no in range(len(cache.shards)):
        unit = cache.read_unit(0, shard_no)
        unit.fingerprint ^= np.uint32(1)
        cache.drop([(0, shard_no, "edited")])  # a unit is written once: another's edit is a new object
        cache.write_unit(0, shard_no, unit)
    ds = ReplayViews(m, recipe, 0, 0, rank=0, world_size=1, annotate=CachedTargets([store, tampered]).annotator())
    with pytest.raises(ReplayKDError, match=rf"view of key '.+' \(epoch 0, .*\) does not match the cache {tampered}: "):
        next(iter(ds))


def test_cache_info_says_whether_caches_share_views_and_how_often_their_top1_agree(store, second_store, tmp_path):
    a, b = TeacherCache.open(store), TeacherCache.open(second_store)
    agree = views = 0
    for epoch in range(2):  # the epochs both hold
        for shard_no in range(len(a.shards)):
            x, y = a.read_unit(epoch, shard_no), b.read_unit(epoch, shard_no)
            assert np.array_equal(x.fingerprint, y.fingerprint)  # the same views, whoever built them
            agree += int((x.classes[:, 0] == y.classes[:, 0]).sum())
            views += len(x.fingerprint)
    info = json.loads(run_cli("cache", "info", store, second_store, "--units", "0", "--json").stdout)
    assert [s["teacher"] for s in info["stores"]] == ["regnety_002", "test_resnet"]
    pair = info["comparisons"][0]
    assert pair["shared_views"] and pair["epochs"] == 2 and pair["views_compared"] == views
    assert pair["fingerprints_differ"] == 0 and pair["top1_agree"] == pytest.approx(100 * agree / views)
    text = run_cli("cache", "info", store, second_store, "--units", "0").stdout
    assert f"{store} and {second_store} share views" in text and f"top-1 agrees on {100 * agree / views:.2f}% of " \
        f"{views} views (16 of the 16 units both hold, epochs 0-1)" in text
    seed = _edited(store, tmp_path / "seed", run_seed=1)
    text = run_cli("cache", "info", store, seed).stdout
    assert f"{store} and {seed} do not share views (run seed 0 vs 1)" in text
    assert json.loads(run_cli("cache", "info", store, "--json").stdout)["teacher"] == "regnety_002"  # one: as before
