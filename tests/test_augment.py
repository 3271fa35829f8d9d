"""Views drawn from the view's own generators: bit-identical to timm's transforms seeded in a quiet process, and
untouched by any other thread drawing from the process-wide generators meanwhile."""
from __future__ import annotations

import dataclasses
import multiprocessing
import random
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from timm.data import Mixup
from torch.utils.data import DataLoader
from timm.data.auto_augment import AugmentOp, rand_augment_transform
from timm.data.mixup import cutmix_bbox_and_lam
from safetensors.torch import load_file

from replaykd import loader
from replaykd.augment import Augmentation, _check_op, draw_mix, draws, erase_values
from replaykd.errors import ReplayKDError
from replaykd.finish import normalise_table
from replaykd.manifest import Manifest
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer, decode_image
from replaykd.targets import CachedTargets
from replaykd.stages.options import StudentOptions
from replaykd.stages.teacher_cache import run as build_cache
from replaykd.stages.train_student import run as train_student
from tests.conftest import arrays, options
from tests.test_finish import photographs
from tests.test_teacher_cache import assert_same_arrays
from tests.timm_reference import seeded_globals

VARIANTS = {
    "deit": {},
    "random interpolation": {"interpolation": "random"},
    "colour jitter, no RandAugment": {"auto_augment": None, "color_jitter": 0.4},
    "erasing per channel, up to 3 boxes": {"re_mode": "rand", "re_count": 3, "re_prob": 0.9},
    "constant erasing": {"re_mode": "const", "re_prob": 0.9},
    "AutoAugment": {"auto_augment": "original"},
    "RandAugment, 3 weighted ops, uniform magnitude": {"auto_augment": "rand-m7-n3-mstd101-tweights"},
    "RandAugment 3a, weighted": {"auto_augment": "rand-m9-n2-t3aw"},
    "RandAugment, plain": {"auto_augment": "rand-m9-n2"},
}


def finished(recipe: Recipe, pixels: torch.Tensor, erase) -> torch.Tensor:
    """The float view: timm's per-level values of each pixel, with the erasing boxes written in, their values drawn
    again from the states the batch carries (as the consumer draws them) and equal to the worker's."""
    table = normalise_table(recipe)
    x = torch.stack([table[c][pixels[..., c].long()] for c in range(3)])
    for e in erase:
        again = erase_values(e.fill, e.state, 3, e.height, e.width)
        assert torch.equal(again, e.values)
        x[:, e.top:e.top + e.height, e.left:e.left + e.width] = again
    return x


@pytest.fixture(scope="module")
def images(digits_dir):
    m = Manifest.load(digits_dir)
    digits = [decode_image(r.data, r.key) for r in read_shard(m, "train", m.shards("train")[0])[:6]]
    photos = [decode_image(r.data, r.key) for r in photographs(6)]
    return {"digits": digits, "photos": photos}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_view_is_timms_transform_seeded_quietly(images, variant):
    for name, size, pictures in (("digits-ra", 16, images["digits"]), ("deit", 64, images["photos"])):
        recipe = dataclasses.replace(Recipe.load(name), input_size=size, **VARIANTS[variant])
        whole, ours = recipe.train_transform(), Augmentation(recipe)
        erased = 0
        for seed in range(40):
            image = pictures[seed % len(pictures)]
            with seeded_globals(seed):
                expected = whole(image)
            d = draws(seed)
            pixels = ours.pixels(image, d)
            erase = ours.erase(pixels, d)
            erased += bool(erase)
            assert torch.equal(finished(recipe, pixels, erase), expected), (variant, name, seed)
        assert erased > 0 or recipe.re_prob == 0


def test_mix_parameters_are_timms_mixup_seeded_quietly():
    recipe = Recipe.load("deit")
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mix_prob,
                  switch_prob=recipe.switch_prob, num_classes=10)
    kinds = set()
    for seed in range(300):
        with seeded_globals(seed):
            lam, use_cutmix = mixup._params_per_batch()
            box = None
            if use_cutmix:
                box, lam = cutmix_bbox_and_lam((37, 53), lam, correct_lam=True)
                box = tuple(int(v) for v in box)
        got = draw_mix(recipe, 37, 53, draws(seed).np)
        assert (got.lam, got.box) == (float(lam), box), seed
        kinds.add(box is None)
    assert kinds == {True, False}
    half = dataclasses.replace(recipe, mix_prob=0.5, mixup=0.0)
    assert sum(draw_mix(half, 8, 8, draws(s).np).lam == 1.0 for s in range(200)) in range(70, 131)


def test_steps_whose_draws_cannot_be_replayed_are_refused_by_name():
    with pytest.raises(ReplayKDError, match="RandAugment op GaussianBlurRand of timm .* does not replay as timm"):
        _check_op(AugmentOp("GaussianBlurRand", prob=0.5, magnitude=5))
    # a level function that draws its sign through a helper of its own: nothing in its code names timm's
    # `_randomly_negate`, which is all the check used to look for
    sneaky = AugmentOp("Rotate", prob=1.0, magnitude=9)

    def flip_sign(value):
        return -value if random.random() > 0.5 else value

    sneaky.level_fn = lambda magnitude, hparams: (flip_sign(magnitude * 3.0),)
    with pytest.raises(ReplayKDError, match="RandAugment op Rotate of timm .* does not replay as timm"):
        _check_op(sneaky)
    for op in rand_augment_transform("rand-m9-mstd0.5-inc1", {"translate_const": 100}).ops:  # DeiT's: each replays
        _check_op(op)
    with pytest.raises(ReplayKDError, match="augmentation step AugMixAugment"):
        Augmentation(dataclasses.replace(Recipe.load("deit"), auto_augment="augmix-m5-w4-d2"))


class Noise:
    """A thread drawing from Python's, numpy's and torch's process-wide generators in a tight loop (as botocore's
    retry back-off draws from `random` in object-store threads), reseeding them now and then; `draws` counts its
    rounds (in `counter`, shared with forked processes, when given)."""

    def __init__(self, counter=None):
        self.stop = threading.Event()
        self.counter = counter if counter is not None else multiprocessing.RawValue("q", 0)
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def draws(self) -> int:
        return self.counter.value

    def _run(self):
        while not self.stop.is_set():
            random.random()
            np.random.random()
            torch.rand(1)
            self.counter.value += 1
            if self.counter.value % 1000 == 0:
                random.seed(self.counter.value)
                np.random.seed(self.counter.value)
                torch.manual_seed(self.counter.value)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


WORKER_DRAWS = multiprocessing.get_context("fork").RawValue("q", 0)  # the loader workers' noisy threads' rounds


def noisy_worker(worker_id: int, setup=loader.setup_worker) -> None:
    """A loader worker's set-up with a noisy thread of its own beside the views it makes."""
    setup(worker_id)
    Noise(WORKER_DRAWS).thread.start()


@contextmanager
def noise_where_views_are_made(workers: int, monkeypatch):
    """A noisy thread in the process that makes the views: this one (no loader workers), else each loader worker.
    (Not in this one while workers are forked: a thread holding torch's generator lock at a fork leaves the child
    waiting on it forever, a hazard of forking beside threads that draw from torch, not of the replay.) Yields a
    function that says how many rounds the noisy threads drew."""
    if workers:
        WORKER_DRAWS.value = 0
        monkeypatch.setattr(loader, "setup_worker", noisy_worker)
        yield lambda: WORKER_DRAWS.value
    else:
        with Noise() as noise:
            yield lambda: noise.draws


def test_views_do_not_depend_on_another_thread_drawing(digits_dir):
    m = Manifest.load(digits_dir)
    records = read_shard(m, "train", m.shards("train")[0])
    images = {r.position: decode_image(r.data, r.key) for r in records}
    replayer = Replayer(Recipe.load("digits-ra"), run_seed=3)
    plan = replayer.plan(len(records), 0, m.shards("train")[0])

    def made():
        return [(v.fingerprint, v.lam, v.box) for item in replayer.items(plan, records, images) for v in item]

    quiet = made()
    with Noise() as noise:
        noisy = made()
    assert noise.draws > 100  # the thread really drew while the views were made
    assert noisy == quiet and len(quiet) == len(plan.slots)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_stage_one_beside_a_noisy_thread_equals_a_quiet_build(digits_dir, teacher_ckpt, store, tmp_path, monkeypatch,
                                                              workers):
    with noise_where_views_are_made(workers, monkeypatch) as draws:  # one epoch: noise slows the build down
        build_cache(options(digits_dir, teacher_ckpt, tmp_path / "noisy", workers=workers, epochs=1))
        assert draws() > 1000
    assert_same_arrays(arrays(tmp_path / "noisy"), {name: a[:1] for name, a in arrays(store).items()})


def stage_two_batches(digits_dir, store, workers: int) -> list:
    """One epoch of stage two's batches as train-student loads them (views made in the loader workers, each
    fingerprint checked against the cache): keys, fingerprints, mix weights and cached targets."""
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    source = CachedTargets(store, "all")
    ds = loader.ReplayViews(m, recipe, 0, 1, rank=0, world_size=1, annotate=source.annotator(), fingerprint_every=1,
                            batch_size=64, shuffle_buffer=256)
    batches = DataLoader(loader.Batched(ds, 64, loader.ViewCollate(10, recipe.smoothing)), batch_size=None,
                         **loader.loader_settings(workers, 2, torch.device("cpu")))
    return [(b.keys, b.fingerprints.tolist(), b.lams.tolist(), b.teacher.probs.tolist(), b.teacher.classes.tolist())
            for b in batches]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_stage_two_beside_a_noisy_thread_replays_the_quiet_views(digits_dir, store, tmp_path, monkeypatch, workers):
    quiet = stage_two_batches(digits_dir, store, workers)
    with noise_where_views_are_made(workers, monkeypatch) as draws:
        assert stage_two_batches(digits_dir, store, workers) == quiet
        # and the whole command, every replayed view checked against the cache
        train_student(StudentOptions.from_mapping(dict(
            out=tmp_path / "run", manifest=digits_dir, cache=store, epochs=1, recipe="digits-ra", patch_size=4, depth=2,
            embed_dim=48, num_heads=2, batch_size=64, workers=workers, device="cpu", check_fingerprints="all",
            eval_split="none")))
        assert draws() > 1000 and len(quiet) > 10


@pytest.mark.slow
def test_the_students_initial_weights_and_drop_path_ignore_a_noisy_thread(digits_dir, store, tmp_path):
    # they drew from torch's global generator: a thread drawing from it changed the run's weights
    def trained(out):
        train_student(StudentOptions.from_mapping(dict(
            out=out, manifest=digits_dir, cache=store, epochs=1, recipe="digits-ra", patch_size=4, depth=1,
            embed_dim=32, num_heads=2, batch_size=64, workers=0, device="cpu", drop_path=0.3, threads=1,
            eval_split="none")))
        return load_file(str(out / "checkpoint.safetensors"))

    quiet = trained(tmp_path / "quiet")
    with Noise() as noise:
        noisy = trained(tmp_path / "noisy")
    assert noise.draws > 1000 and quiet.keys() == noisy.keys()
    assert all(torch.equal(quiet[k], noisy[k]) for k in quiet)
