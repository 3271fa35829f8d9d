"""The float steps run where the batch is consumed, and give the same bits as timm's whole transform followed by
the replay's (former, in-worker) mixing; on a GPU, the same bits as on the CPU."""
from __future__ import annotations

import dataclasses
import io
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from replaykd.finish import Finisher, normalise_table
from replaykd.loader import ViewCollate
from replaykd.manifest import Manifest
from replaykd.reader import Record, read_shard
from replaykd.recipe import Recipe
from replaykd.records import MixParams
from replaykd.replay import Replayer, decode_image, view_seed
from tests.timm_reference import seeded_globals


def reference_mix(a: torch.Tensor, b: torch.Tensor, p: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
    """How the replay mixed a pair of float views in the worker before the float steps moved (numpy, float32)."""
    if p.box is None and p.lam == 1.0:
        return a, b
    an, bn = a.numpy(), b.numpy()
    if p.box is not None:
        ma, mb = an.copy(), bn.copy()
        y0, y1, x0, x1 = p.box
        ma[:, y0:y1, x0:x1] = bn[:, y0:y1, x0:x1]
        mb[:, y0:y1, x0:x1] = an[:, y0:y1, x0:x1]
    else:
        ma, mb = an * p.lam + bn * (1.0 - p.lam), bn * p.lam + an * (1.0 - p.lam)
    return torch.from_numpy(ma), torch.from_numpy(mb)


def reference_views(replayer: Replayer, plan, records, images) -> torch.Tensor:
    """Each view as timm's whole transform makes it (crop ... normalise, erase) under the view's seed, then mixed."""
    whole = replayer.recipe.train_transform()
    out = []
    for item in range(plan.items):
        slots = [plan.slots[s] for s in plan.item_slots(item)]
        floats = []
        for s in slots:
            with seeded_globals(view_seed(replayer.run_seed, plan.epoch, records[s.position].key, s.repeat)):
                floats.append(whole(images[s.position]))
        if len(slots) == 2:
            members = [(records[s.position].key, s.repeat) for s in slots]
            mix, partners = replayer.mix_params(plan, item, members, *floats[0].shape[-2:])
            assert mix == partners  # the recipe's mix_mode (group or pair) mixes both views of a pair alike
            floats = reference_mix(*floats, mix)
        out.extend(floats)
    return torch.stack(out)


def photographs(n: int) -> list[Record]:
    """Real photographs (scikit-learn's two samples) cut into n 500x375 JPEGs."""
    from sklearn.datasets import load_sample_images

    photos, rng, out = load_sample_images().images, np.random.default_rng(0), []
    for i in range(n):
        img = photos[i % 2]
        y, x = int(rng.integers(img.shape[0] - 375)), int(rng.integers(img.shape[1] - 500))
        buf = io.BytesIO()
        Image.fromarray(img[y:y + 375, x:x + 500]).save(buf, format="JPEG", quality=90)
        out.append(Record(i, f"photo{i:03d}", i % 2, i, buf.getvalue()))
    return out


def finished(replayer, plan, records, images, device="cpu"):
    views = [v for item in replayer.items(plan, records, images) for v in item]
    batch = ViewCollate(10, 0.1)(views)
    return batch, Finisher(replayer.recipe)(batch, torch.device(device))


def test_the_table_is_timms_per_pixel_arithmetic():
    recipe = Recipe.load("deit")
    table = normalise_table(recipe)
    levels = torch.arange(256, dtype=torch.float32)
    mean, std = torch.tensor(recipe.mean).view(3, 1), torch.tensor(recipe.std).view(3, 1)
    assert torch.equal(table, (levels.div(255).expand(3, -1) - mean) / std)


def test_a_view_finishes_alone_in_any_batch(digits_dir):
    m = Manifest.load(digits_dir)
    records = read_shard(m, "train", m.shards("train")[1])
    images = {r.position: decode_image(r.data, r.key) for r in records}
    replayer = Replayer(Recipe.load("digits-ra"), 4)
    plan = replayer.plan(len(records), 2, "s")
    _, together = finished(replayer, plan, records, images)
    views = [v for item in replayer.items(plan, records, images) for v in item]
    order = np.random.default_rng(0).permutation(len(views))
    shuffled = ViewCollate(10, 0.1)([views[i] for i in order[: len(order) // 2]])
    assert len(shuffled) < len(shuffled.images[0]) < 2 * len(shuffled)  # views whose partner is elsewhere bring it
    apart = Finisher(replayer.recipe)(shuffled, torch.device("cpu"))
    assert torch.equal(apart, together[torch.from_numpy(order[: len(order) // 2])])  # pairs split: the same views


def test_digits_views_equal_timm_and_the_former_mixing(digits_dir):
    m = Manifest.load(digits_dir)
    shard = m.shards("train")[2]
    records = read_shard(m, "train", shard)
    images = {r.position: decode_image(r.data, r.key) for r in records}
    replayer = Replayer(Recipe.load("digits-ra"), 11)
    kinds = Counter()
    for epoch in (0, 1, 2):
        plan = replayer.plan(len(records), epoch, shard)
        batch, views = finished(replayer, plan, records, images)
        assert batch.images[0].dtype == torch.uint8 and batch.partner_rows is not None
        assert len(batch.images[0]) == len(batch)  # whole pairs: each image once
        assert torch.equal(views, reference_views(replayer, plan, records, images))
        kinds.update(erased=len(batch.erase_boxes), cutmix=int((batch.mix_boxes[:, 0] >= 0).sum()),
                     mixup=int(((batch.lams < 1) & (batch.mix_boxes[:, 0] < 0)).sum()), views=len(batch))
    assert 0.15 < kinds["erased"] / kinds["views"] < 0.35  # re_prob 0.25
    assert kinds["cutmix"] > 100 and kinds["mixup"] > 100


def test_deit_views_of_photographs_equal_timm_and_the_former_mixing():
    records = photographs(12)
    images = {r.position: decode_image(r.data, r.key) for r in records}
    replayer = Replayer(Recipe.load("deit"), 3)
    erased = 0
    for epoch in range(3):
        plan = replayer.plan(len(records), epoch, "photos")
        batch, views = finished(replayer, plan, records, images)
        assert views.shape[1:] == (3, 224, 224) and batch.images[0].shape[1:] == (224, 224, 3)
        assert torch.equal(views, reference_views(replayer, plan, records, images))
        erased += len(batch.erase_boxes)
        # a worker sends each box's generator state, not its values (3 x 4 bytes a pixel, ~106 KB a box at 224 px)
        bare = dataclasses.replace(batch, images=[])
        no_boxes = dataclasses.replace(bare, erase_boxes=bare.erase_boxes[:0], erase_states=bare.erase_states[:0])
        assert len(pickle.dumps(bare)) - len(pickle.dumps(no_boxes)) <= 5200 * len(batch.erase_boxes)
    assert erased > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_and_gpu_finish_to_the_same_bits(digits_dir):
    for recipe, records in ((Recipe.load("deit"), photographs(16)), (Recipe.load("digits-ra"), None)):
        if records is None:
            m = Manifest.load(digits_dir)
            records = read_shard(m, "train", m.shards("train")[0])
        images = {r.position: decode_image(r.data, r.key) for r in records}
        replayer = Replayer(recipe, 5)
        plan = replayer.plan(len(records), 0, "s")
        batch, on_cpu = finished(replayer, plan, records, images)
        on_gpu = Finisher(recipe)(batch, torch.device("cuda"))
        assert torch.equal(on_gpu.cpu(), on_cpu)
