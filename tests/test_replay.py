"""Augmentation replay: views are a pure function of (seed, epoch, key, recipe), whatever runs them."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.loader import ReplayViews, ViewCollate
from pipeline.manifest import Manifest
from pipeline.reader import read_shard
from pipeline.recipe import Recipe
from pipeline.replay import Replayer, decode_image, fingerprint, pair_positions

EPOCHS = [0, 1]


def views_of(ds) -> dict:
    """(key, epoch) -> (fingerprint, partner, lam) over a whole dataset; a sample seen twice fails."""
    out = {}
    for view in ds:
        k = (view.key, view.epoch)
        assert k not in out, f"{k} made twice"
        out[k] = (view.fingerprint, view.partner, view.lam)
    return out


def loader_views(ds, workers: int) -> dict:
    out = {}
    for batch in DataLoader(ds, batch_size=37, num_workers=workers, collate_fn=ViewCollate(10, 0.1)):
        for key, epoch, fp, partner, lam in zip(batch.keys, batch.epochs.tolist(), batch.fingerprints.tolist(),
                                                batch.partners.tolist(), batch.lams.tolist()):
            assert (key, epoch) not in out
            out[(key, epoch)] = (fp, partner, lam)
    return out


def _spawned_fingerprints(data_dir: str) -> dict:
    return views_of(ReplayViews(Manifest.load(data_dir), Recipe.load("digits"), 7, EPOCHS, rank=0, world_size=1))


@pytest.fixture(scope="module")
def reference(digits_dir):
    return views_of(ReplayViews(Manifest.load(digits_dir), Recipe.load("digits"), 7, EPOCHS, rank=0, world_size=1))


def test_every_sample_once_per_epoch(digits_dir, reference):
    m = Manifest.load(digits_dir)
    keys = m.table("train").column("key").to_pylist()
    assert set(reference) == {(k, e) for k in keys for e in EPOCHS}


@pytest.mark.slow
def test_same_in_process_and_spawned_process(digits_dir, reference):
    again = views_of(ReplayViews(Manifest.load(digits_dir), Recipe.load("digits"), 7, EPOCHS, rank=0, world_size=1))
    assert again == reference
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_spawned_fingerprints, (str(digits_dir),)) == reference


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_same_with_dataloader_workers(digits_dir, reference, workers):
    ds = ReplayViews(Manifest.load(digits_dir), Recipe.load("digits"), 7, EPOCHS, rank=0, world_size=1,
                     shuffle_buffer=64 if workers == 3 else 0)
    assert loader_views(ds, workers) == reference


@pytest.mark.parametrize("world_size", [2, 3])
def test_same_across_simulated_ranks(digits_dir, reference, world_size):
    merged = {}
    for rank in range(world_size):
        part = views_of(ReplayViews(Manifest.load(digits_dir), Recipe.load("digits"), 7, EPOCHS, rank=rank,
                                    world_size=world_size))
        assert not set(part) & set(merged)
        merged.update(part)
    assert merged == reference  # same views, same pairs, same lambdas


def test_other_seed_and_epoch_change_views(digits_dir, reference):
    keys = {k for k, _ in reference}
    changed = sum(reference[(k, 0)][0] != reference[(k, 1)][0] for k in keys)
    assert changed >= 0.99 * len(keys)
    other = views_of(ReplayViews(Manifest.load(digits_dir), Recipe.load("digits"), 8, [0], rank=0, world_size=1))
    assert sum(other[(k, 0)][0] != reference[(k, 0)][0] for k in keys) >= 0.99 * len(keys)


def test_the_recipe_really_augments(digits_dir):
    m = Manifest.load(digits_dir)
    recipe = dataclasses.replace(Recipe.load("digits"), mix_prob=0.0)
    rep = Replayer(recipe, run_seed=3)
    crop, flip, rand_aug = rep.transform.transforms[:3]
    boxes, flips, ops = [], [], Counter()
    get_params = crop.get_params
    crop.get_params = lambda *a: boxes.append(get_params(*a)) or boxes[-1]
    rep.transform.transforms[1] = lambda img: _record_flip(flip, img, flips)
    for op in rand_aug.ops:
        op.aug_fn = _recording(op.name, op.aug_fn, ops)
    rec = read_shard(m, "train", m.shards("train")[0])[0]
    image = decode_image(rec.data, rec.key)
    views = [rep.view(image, rec.key, epoch)[0] for epoch in range(100)]
    assert len(set(boxes)) >= 90
    assert 30 <= sum(flips) <= 70
    assert len(ops) >= 10 and sum(ops.values()) >= 60  # two ops per view, each applied with p=0.5
    mean, std = torch.tensor(recipe.mean).view(3, 1, 1), torch.tensor(recipe.std).view(3, 1, 1)
    # PIL ops keep pixels on the uint8 grid; pixel-mode erasing fills with normal noise, which is off it
    off_grid = [((v * std + mean) * 255 - ((v * std + mean) * 255).round()).abs().max() > 1e-3 for v in views]
    assert 10 <= sum(off_grid) <= 45  # p = 0.25
    assert len({fingerprint(v) for v in views}) == 100


def _record_flip(flip, img, log):
    out = flip(img)
    log.append(out is not img)
    return out


def _recording(name, fn, counter):
    def wrapped(img, *args, **kwargs):
        counter[name] += 1
        return fn(img, *args, **kwargs)
    return wrapped


def test_mixed_views_and_targets(digits_dir):
    m = Manifest.load(digits_dir)
    recipe = Recipe.load("digits")
    shard = m.shards("train")[0]
    records = read_shard(m, "train", shard)
    images = [decode_image(r.data, r.key) for r in records]
    keys = [r.key for r in records]
    rep = Replayer(recipe, run_seed=5)
    items = list(rep.shard_views(images, keys, [r.label for r in records], [r.index for r in records], 0, shard))
    by_position = {it.position: it for it in items}
    kinds = Counter()
    for p, q in pair_positions(len(records), 5, 0, shard):
        assert p != q or len(records) % 2  # only an odd one out is left unmixed
        a, _ = rep.view(images[p], keys[p], 0)
        b, _ = rep.view(images[q], keys[q], 0)
        params = rep.mix_params((keys[p], keys[q]), 0, *a.shape[-2:])
        va, vb = by_position[p], by_position[q]
        assert va.partner == vb.index and vb.partner == va.index and va.lam == vb.lam == params.lam
        if params.box is None:
            kinds["mixup"] += 1
            assert torch.allclose(va.image, a * params.lam + b * (1 - params.lam), atol=1e-6)
            assert torch.allclose(vb.image, b * params.lam + a * (1 - params.lam), atol=1e-6)
        else:
            kinds["cutmix"] += 1
            y0, y1, x0, x1 = params.box
            inside = torch.zeros_like(a, dtype=torch.bool)
            inside[:, y0:y1, x0:x1] = True
            assert torch.equal(va.image[inside], b[inside]) and torch.equal(va.image[~inside], a[~inside])
            assert torch.equal(vb.image[inside], a[inside]) and torch.equal(vb.image[~inside], b[~inside])
            assert params.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (a.shape[-1] * a.shape[-2]))
    assert kinds["mixup"] > 20 and kinds["cutmix"] > 20
    batch = ViewCollate(10, recipe.smoothing)(items)
    assert torch.allclose(batch.targets.sum(1), torch.ones(len(items)))
    lam = batch.lams.float()
    own = batch.targets.gather(1, batch.labels.view(-1, 1)).squeeze(1)
    same = batch.labels == batch.partner_labels
    expected = torch.where(same, torch.tensor(0.9 + 0.01), lam * 0.9 + 0.01)
    assert torch.allclose(own, expected, atol=1e-6)


def test_global_generators_unchanged(digits_dir):
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    list(ReplayViews(Manifest.load(digits_dir), Recipe.load("digits"), 7, [0], rank=0, world_size=1))
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
