"""Augmentation replay: views are a pure function of (seed, epoch, key, repeat, recipe), whatever runs them."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from replaykd.loader import ReplayViews, ViewCollate
from replaykd.manifest import Manifest
from replaykd.plan import chosen_positions
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.records import MixParams
from replaykd.replay import Replayer, decode_image, fingerprint

EPOCHS = [0, 1]


def views_of(views) -> dict:
    """(key, epoch, repeat) -> (fingerprint, partner, lam, slot) over a stream of views; a view made twice fails."""
    out = {}
    for view in views:
        k = (view.key, view.epoch, view.repeat)
        assert k not in out, f"{k} made twice"
        out[k] = (view.fingerprint, view.partner, view.lam, view.slot)
    return out


def epochs_of(digits_dir, epochs=EPOCHS, seed=7, **kw) -> dict:
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    out = {}
    for epoch in epochs:
        out.update(views_of(ReplayViews(m, recipe, seed, epoch, **{"rank": 0, "world_size": 1, **kw})))
    return out


def loader_views(ds, workers: int) -> dict:
    out = {}
    loader = DataLoader(ds, batch_size=37, num_workers=workers, collate_fn=ViewCollate(10, 0.1))
    for batch in loader:
        assert len(batch) <= 37 and batch.partner_rows is not None
        for key, epoch, repeat, fp, partner, lam, slot in zip(
                batch.keys, batch.epochs.tolist(), batch.repeats.tolist(), batch.fingerprints.tolist(),
                batch.partners.tolist(), batch.lams.tolist(), batch.slots.tolist()):
            assert (key, epoch, repeat) not in out
            out[(key, epoch, repeat)] = (fp, partner, lam, slot)
    return out


def _spawned(data_dir: str) -> dict:
    return epochs_of(data_dir)


@pytest.fixture(scope="module")
def reference(digits_dir):
    return epochs_of(digits_dir)


def test_each_epoch_holds_the_recipes_views(digits_dir, reference):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    assert recipe.repeats == 3 and recipe.mixes
    for epoch in EPOCHS:
        got = Counter(key for key, e, _ in reference if e == epoch)
        expected = Counter()
        for shard in m.shards("train"):
            keys = m.shard_rows("train", shard).column("key").to_pylist()
            expected.update({keys[p]: 3 for p in chosen_positions(len(keys), 3, 7, epoch, shard)})
        assert set(got.values()) <= {2, 3} and sum((expected - got).values()) <= len(m.shards("train"))  # odd drops
        assert not got - expected
    assert len(reference) >= 2 * m.count("train") - 2 * len(m.shards("train"))  # about N views per epoch


@pytest.mark.slow
def test_same_in_process_and_spawned_process(digits_dir, reference):
    assert epochs_of(digits_dir) == reference
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_spawned, (str(digits_dir),)) == reference


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_same_with_dataloader_workers(digits_dir, reference, workers):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    got = {}
    for epoch in EPOCHS:
        ds = ReplayViews(m, recipe, 7, epoch, rank=0, world_size=1, shuffle_buffer=64 if workers == 3 else 0)
        got.update(loader_views(ds, workers))
    assert got == reference


def test_same_views_when_images_are_decoded_in_groups(digits_dir, reference):
    # a decode budget smaller than a unit's images: the items come group pair by group pair, the views are the same
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    got = {}
    for epoch in EPOCHS:
        ds = ReplayViews(m, recipe, 7, epoch, rank=0, world_size=1, decode_memory=16 * 32 * 32 * 4)
        got.update(views_of(ds))
    assert got == reference


def test_a_unit_larger_than_the_budget_is_still_decoded_once(digits_dir, reference, monkeypatch):
    # a budget that holds one pairing group's images (~34 digits of 1 KB) but not a unit's (~67): group by group
    import replaykd.decoding as decoding

    decoded = Counter()
    decode = decoding.replay.decode_image
    monkeypatch.setattr(decoding.replay, "decode_image", lambda data, origin: decoded.update([origin]) or
                        decode(data, origin))
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    got = {}
    for epoch in EPOCHS:
        got.update(views_of(ReplayViews(m, recipe, 7, epoch, rank=0, world_size=1, decode_memory=40 * 16 * 16 * 4)))
    assert got == reference
    assert set(decoded.values()) == {1} and len(decoded) == len({(k, e) for k, e, _ in reference}) > 0


def test_decode_steps_make_every_item_once_within_the_budget():
    from replaykd.decoding import decode_steps

    rng = np.random.default_rng(0)
    positions = rng.permutation(300)
    items = []  # 15 pairing groups of 20 samples: pairs inside a group, each sample in three items (its repeats)
    for g in range(15):
        group = positions[20 * g:20 * (g + 1)]
        for _ in range(3):
            order = rng.permutation(group)
            items += [tuple(order[i:i + 2]) for i in range(0, 20, 2)]
    items = [items[i] for i in rng.permutation(len(items))]  # the order of items does not matter
    sizes = {p: int(rng.integers(1, 10)) for p in range(300)}
    largest = max(sum(sizes[p] for p in positions[20 * g:20 * (g + 1)]) for g in range(15))
    for budget in (10**6, 400, largest, 30):
        steps = decode_steps(items, sizes, budget)
        assert sorted(i for _, which in steps for i in which) == list(range(len(items)))
        for held, which in steps:
            assert all(p in held for i in which for p in items[i])
            assert sum(sizes[p] for p in held) <= max(budget, 2 * max(sizes.values()))
        decodes = sum(len(held) for held, _ in steps)
        if budget >= largest:  # whole groups at a time: every image decoded once
            assert decodes == 300
        else:  # groups larger than the budget, in parts: some images again, at most once per part pair
            assert 300 < decodes <= 300 * (len(steps) + 1)
    assert len(decode_steps(items, sizes, 10**6)) == 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_same_views_across_simulated_ranks_in_equal_shares(digits_dir, reference, world_size):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    merged, shares = {}, []
    for rank in range(world_size):
        part = {}
        for epoch in EPOCHS:
            ds = ReplayViews(m, recipe, 7, epoch, rank=rank, world_size=world_size)
            part.update(views_of(ds))
            assert ds.views() == len(ds) == ds.plan().rank_items(world_size) * 2
        assert not set(part) & set(merged)
        merged.update(part)
        shares.append(len(part))
    assert len(set(shares)) == 1  # every rank the same number of views
    assert all(reference[k] == v for k, v in merged.items())  # same views, same pairs, same lambdas
    assert len(reference) - len(merged) < 2 * world_size * len(EPOCHS)  # the remainder left out of each epoch


def test_pairs_stay_together_in_shuffled_batches(digits_dir):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    ds = ReplayViews(m, recipe, 7, 0, rank=0, world_size=1, shuffle_buffer=1024)
    plan, keys = ds.plan(), []
    for batch in DataLoader(ds, batch_size=64, collate_fn=ViewCollate(10, 0.1)):
        assert torch.equal(batch.image_rows, torch.arange(len(batch)))  # as timm's Mixup: each view's partner is in its batch
        assert torch.equal(batch.indices[batch.partner_rows], batch.partners)
        keys += list(zip(batch.slots.tolist(), batch.shard_nos.tolist()))
    order = [slot // plan.group for slot, _ in keys[::2]]
    assert order != sorted(order)  # shuffled, by whole pairs


def test_a_fresh_order_every_epoch(digits_dir):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    firsts = []
    for epoch in (0, 1, 2):
        loader = DataLoader(ReplayViews(m, recipe, 7, epoch, rank=0, world_size=1), batch_size=16,
                            collate_fn=ViewCollate(10, 0.1))
        firsts.append(next(iter(loader)).keys)
    assert firsts[0] != firsts[1] != firsts[2]
    # cycling cached epochs (--reuse-epochs): epoch 5 of 5 cached ones replays epoch 0's views in a new order
    again = ReplayViews(m, recipe, 7, 5, rank=0, world_size=1, view_epochs=5)
    assert views_of(again) == views_of(ReplayViews(m, recipe, 7, 0, rank=0, world_size=1))
    assert again.plan().order != ReplayViews(m, recipe, 7, 0, rank=0, world_size=1).plan().order


def test_other_seed_and_epoch_change_views(digits_dir, reference):
    by_epoch = {e: {(k, r): v[0] for (k, ep, r), v in reference.items() if ep == e} for e in EPOCHS}
    assert len(set(by_epoch[0].values()) & set(by_epoch[1].values())) == 0
    other = epochs_of(digits_dir, [0], seed=8)
    same = set(other) & set(reference)
    assert sum(other[k][0] != reference[k][0] for k in same) >= 0.99 * len(same)


def test_the_recipe_really_augments(digits_dir, monkeypatch):
    import replaykd.augment as augment

    m = Manifest.load(digits_dir)
    recipe = dataclasses.replace(Recipe.load("digits-ra"), mix_prob=0.0)
    rep = Replayer(recipe, run_seed=3)
    steps = rep.augmentation.steps
    boxes, flips, ops = [], [], Counter()
    crop_box = augment.crop_box
    monkeypatch.setattr(augment, "crop_box", lambda *a: boxes.append(crop_box(*a)) or boxes[-1])
    steps[1] = lambda img, d, flip=steps[1]: _record_flip(flip, img, d, flips)
    for op in steps[2].args[-1].ops:
        op.aug_fn = _recording(op.name, op.aug_fn, ops)
    rec = read_shard(m, "train", m.shards("train")[0])[0]
    image = decode_image(rec.data, rec.key)
    views = [rep.view(image, rec.key, epoch % 50, epoch // 50) for epoch in range(100)]
    assert len(set(boxes)) >= 90
    assert 30 <= sum(flips) <= 70
    assert len(ops) >= 10 and sum(ops.values()) >= 60  # two ops per view, each applied with p=0.5
    assert all(pixels.dtype == torch.uint8 and pixels.shape == (16, 16, 3) for pixels, _, _ in views)
    erased = [erase for _, erase, _ in views if erase]
    assert 10 <= len(erased) <= 45  # p = 0.25
    assert all(e.values.shape == (3, e.height, e.width) and e.values.std() > 0.5 for es in erased for e in es)
    assert len({fingerprint(pixels, erase, MixParams(), -1) for pixels, erase, _ in views}) == 100  # repeats differ too


def _record_flip(flip, img, d, log):
    out = flip(img, d)
    log.append(out is not img)
    return out


def _recording(name, fn, counter):
    def wrapped(img, *args, **kwargs):
        counter[name] += 1
        return fn(img, *args, **kwargs)
    return wrapped


@pytest.mark.parametrize("mix_mode", ["group", "pair", "elem"])
def test_pairs_carry_their_views_and_mix_parameters(digits_dir, mix_mode):
    m = Manifest.load(digits_dir)
    recipe = dataclasses.replace(Recipe.load("digits-ra"), mix_mode=mix_mode)
    shard = m.shards("train")[0]
    records = read_shard(m, "train", shard)
    images = {r.position: decode_image(r.data, r.key) for r in records}
    rep = Replayer(recipe, run_seed=5)
    plan = rep.plan(len(records), 0, shard)
    items = list(rep.items(plan, records, images))
    assert len(items) == plan.items and all(len(item) == 2 for item in items)
    kinds, by_group = Counter(), {}
    for (va, vb), i in zip(items, range(0, len(plan.slots), 2)):
        sa, sb = plan.slots[i], plan.slots[i + 1]
        assert (va.position, va.repeat, va.slot, vb.position, vb.repeat, vb.slot) == (sa.position, sa.repeat, i, sb.position, sb.repeat, i + 1)
        for v, s in ((va, sa), (vb, sb)):
            pixels, erase, seed = rep.view(images[s.position], v.key, 0, s.repeat)
            assert torch.equal(v.image, pixels) and v.seed == seed and len(v.erase) == len(erase)
            assert all(torch.equal(a.values, b.values) and a.top == b.top for a, b in zip(v.erase, erase))
        pa, pb = rep.mix_params(plan, i // 2, ((va.key, va.repeat), (vb.key, vb.repeat)), *va.image.shape[:2])
        assert va.partner == vb.index and vb.partner == va.index
        assert (va.lam, va.box) == (pa.lam, pa.box) and (vb.lam, vb.box) == (pb.lam, pb.box)
        by_group.setdefault(plan.pairing_group(i // 2), set()).add((va.lam, va.box, vb.lam, vb.box))
        for params in (pa, pb):
            kinds["cutmix" if params.box else "mixup"] += 1
            if params.box:
                y0, y1, x0, x1 = params.box
                assert params.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (16 * 16))
    if mix_mode == "group":  # timm's batch mode, a pairing group for a batch: one draw for all its pairs
        assert len(by_group) == len(plan.group_ends) > 1 and all(len(d) == 1 for d in by_group.values())
        assert len(set.union(*by_group.values())) == len(by_group)
    else:  # a draw per pair (both views alike), or per view (timm's elem mode: the two views apart)
        same = sum(a == c and b == d for draws in by_group.values() for a, b, c, d in draws)
        assert kinds["mixup"] > 20 and kinds["cutmix"] > 20
        assert same == plan.items if mix_mode == "pair" else same < plan.items / 4
    batch = ViewCollate(10, recipe.smoothing)([v for item in items for v in item])
    assert batch.images[0].dtype == torch.uint8
    assert len(batch.images[0]) == len(batch)  # a pair's two views share their two images
    assert torch.equal(batch.partner_rows[0::2], batch.image_rows[1::2])
    assert torch.equal(batch.partner_rows[1::2], batch.image_rows[0::2])
    assert torch.allclose(batch.targets.sum(1), torch.ones(len(batch)))
    lam = batch.lams.float()
    own = batch.targets.gather(1, batch.labels.view(-1, 1)).squeeze(1)
    same = batch.labels == batch.partner_labels
    expected = torch.where(same, torch.tensor(0.9 + 0.01), lam * 0.9 + 0.01)
    assert torch.allclose(own, expected, atol=1e-6)
    # a view replayed alone (as verify does) equals the one made with its unit
    assert torch.equal(rep.view_at(plan, records, 5).image, batch.images[0][batch.image_rows[5]])


def test_global_generators_unchanged(digits_dir):
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    list(ReplayViews(Manifest.load(digits_dir), Recipe.load("digits-ra"), 7, 0, rank=0, world_size=1))
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
