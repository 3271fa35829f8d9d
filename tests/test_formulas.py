"""Fast unit tests of the formulas: DeiT's distillation loss, the sparse-to-dense target, the schedule, unit buffers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from replaykd.cache import UnitArrays, decode_sorted_float16, encode_sorted_float16
from replaykd.cache_writer import UnitBuffers
from replaykd.losses import DistillationLoss, dense_target, soft_target_ce
from replaykd.records import TeacherTargets
from replaykd.schedule import cosine_lr

C = 12


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (torch.randn(8, C, generator=g) * 3 for _ in range(3))
    labels = torch.randint(C, (8,), generator=g)
    target = F.one_hot(labels, C).float() * 0.9 + 0.1 / C
    return cls, dist, teacher, target


def test_hard_distillation_is_deits(batch):
    cls, dist, teacher, target = batch
    got = DistillationLoss("hard", alpha=0.3, num_classes=C)((cls, dist), target, TeacherTargets.from_logits(teacher, 5))
    # facebookresearch/deit losses.py, distillation_type == 'hard'
    base = torch.sum(-target * F.log_softmax(cls, dim=-1), dim=-1).mean()
    kd = F.cross_entropy(dist, teacher.argmax(dim=1))
    assert torch.allclose(got.loss, 0.7 * base + 0.3 * kd) and torch.allclose(got.distill, kd)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_distillation_is_deits_times_the_class_count(batch, tau):
    cls, dist, teacher, target = batch
    # with k = C the sparse target holds the whole (float16-rounded) softmax, so only the reduction differs
    got = DistillationLoss("soft", alpha=1.0, tau=tau, num_classes=C, soft_scale="batchmean")(
        (cls, dist), target, TeacherTargets.from_logits(teacher, C))
    deit = F.kl_div(F.log_softmax(dist / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum",
                    log_target=True) * (tau * tau) / dist.numel()
    assert got.loss.item() == pytest.approx(deit.item() * C, rel=2e-3)


def test_none_trains_both_heads_on_labels(batch):
    cls, dist, _, target = batch
    got = DistillationLoss("none", num_classes=C)((cls, dist), target)
    assert torch.allclose(got.loss, 0.5 * (soft_target_ce(cls, target) + soft_target_ce(dist, target)))


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_one_head_students_learn_labels_and_teacher_on_that_head(batch, tau):
    logits, _, teacher, target = batch
    # hard: timm's logit distillation with the teacher's top-1 as the target
    hard = DistillationLoss("hard", alpha=0.25, num_classes=C)(logits, target, TeacherTargets.from_logits(teacher, 5))
    assert torch.allclose(hard.loss, 0.75 * soft_target_ce(logits, target)
                          + 0.25 * F.cross_entropy(logits, teacher.argmax(1)))
    # soft with the whole distribution: timm's LogitDistillationTask kd_loss (batchmean KL at tau, times tau^2)
    soft = DistillationLoss("soft", alpha=0.4, tau=tau, num_classes=C, soft_scale="batchmean")(
        logits, target, TeacherTargets.from_logits(teacher, C))
    timm_kd = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                       log_target=True) * tau ** 2
    assert soft.loss.item() == pytest.approx((0.6 * soft_target_ce(logits, target) + 0.4 * timm_kd).item(), rel=2e-3)


def test_soft_target_ce_of_one_hot_is_cross_entropy(batch):
    cls, _, _, _ = batch
    labels = torch.arange(8) % C
    assert torch.allclose(soft_target_ce(cls, F.one_hot(labels, C).float()), F.cross_entropy(cls, labels))
    none = DistillationLoss("none", num_classes=C)(cls, F.one_hot(labels, C).float())
    assert torch.allclose(none.loss, F.cross_entropy(cls, labels)) and none.distill == 0


def test_dense_target_spreads_the_rest_evenly():
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.9, 0.05, 0.01]])
    classes = torch.tensor([[3, 0, 7], [1, 2, 3]])
    dense = dense_target(probs, classes, 10)
    assert torch.allclose(dense.sum(1), torch.ones(2))
    assert torch.allclose(dense.gather(1, classes), probs)
    others = torch.ones_like(dense, dtype=torch.bool).scatter_(1, classes, False)
    assert torch.allclose(dense[0][others[0]], torch.full((7,), 0.2 / 7))
    assert torch.allclose(dense[1][others[1]], torch.full((7,), 0.04 / 7))
    # tempering: q ∝ p^(1/tau), i.e. softmax(log p / tau)
    assert torch.allclose(dense_target(probs, classes, 10, tau=2.0), torch.softmax(dense.log() / 2.0, dim=1))


def test_cosine_lr_warms_up_then_decays():
    base, low, warm, total = 1e-3, 1e-5, 10, 110
    lrs = [cosine_lr(s, total, warm, base, low) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(base / warm) and lrs[warm - 1] == pytest.approx(base)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm]))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lrs[warm] == pytest.approx(base) and lrs[warm + 50] == pytest.approx((base + low) / 2)
    assert lrs[total] == pytest.approx(low) and lrs[-1] == pytest.approx(low)
    assert cosine_lr(0, 100, 0, base, low) == pytest.approx(base)
    assert not math.isnan(cosine_lr(5, 5, 5, base, low))


def test_unit_buffers_hand_back_each_unit_once_in_slot_order():
    sizes, k = {(0, 0): 5, (0, 1): 3, (1, 0): 4, (1, 1): 3}, 2
    rng = np.random.default_rng(0)
    views = [(e, s, p) for (e, s), n in sizes.items() for p in range(n)]
    order = rng.permutation(len(views))
    expected = {v: rng.random(k).astype(np.float16) for v in views}
    buffers, done = UnitBuffers(lambda e, s: sizes[(e, s)], k, num_classes=10), {}
    for chunk in np.array_split(order, 4):  # batches that cut across units
        rows = UnitArrays.zeros(len(chunk), k, 10)
        for i, j in enumerate(chunk):
            rows.probs[i] = expected[views[j]]
            rows.fingerprint[i] = views[j][2] + 100
        e, s, p = (np.array([views[j][n] for j in chunk]) for n in range(3))
        for epoch, shard, arrays in buffers.add(e, s, p, rows):
            assert (epoch, shard) not in done
            done[(epoch, shard)] = arrays
    assert sorted(done) == [(0, 0), (0, 1), (1, 0), (1, 1)] and not buffers.open
    for (epoch, shard), arrays in done.items():
        n = sizes[(epoch, shard)]
        assert arrays.classes.dtype == np.int16 and arrays.probs.dtype == np.float16
        assert np.array_equal(arrays.fingerprint, np.arange(n) + 100)
        assert np.array_equal(arrays.probs, np.stack([expected[(epoch, shard, p)] for p in range(n)]))


def test_probability_encoding_is_exact_and_small_for_sorted_rows():
    rng = np.random.default_rng(0)
    rows = np.sort(rng.dirichlet(np.ones(50), size=64)[:, :10], axis=1)[:, ::-1].astype(np.float16)
    stored = encode_sorted_float16(rows)
    assert stored.dtype == np.uint16 and np.array_equal(decode_sorted_float16(stored).view(np.uint16), rows.view(np.uint16))
    assert (stored[:, 1:] < 2048).mean() > 0.9  # differences of neighbouring bit patterns are small numbers
    wild = rng.normal(0, 100, (32, 7)).astype(np.float16)
    wild[0, 0], wild[1, 3] = np.nan, np.inf
    assert np.array_equal(decode_sorted_float16(encode_sorted_float16(wild)).view(np.uint16), wild.view(np.uint16))


def test_draft_decoding_reach_depends_on_the_image_size():
    from replaykd.recipe import Recipe
    from replaykd.stages.bench.loader import draft_eligible

    deit = Recipe.load("deit")
    assert draft_eligible(deit, (500, 375), 300) == 0.0  # a 375 px side is under twice 224: no crop qualifies
    assert 0.0 < draft_eligible(deit, (1000, 750), 300) < 1.0  # larger photographs: some repeats' crops do


@pytest.mark.parametrize("num_classes", [1000, 40_000])
def test_a_units_rows_pack_into_uint16_columns_and_back_exactly(num_classes):
    rng = np.random.default_rng(1)
    unit = UnitArrays.zeros(37, 5, num_classes)
    unit.probs[:] = np.sort(rng.dirichlet(np.ones(20), size=37)[:, :5], axis=1)[:, ::-1]
    unit.classes[:] = rng.integers(num_classes, size=(37, 5))
    unit.fingerprint[:] = rng.integers(2**32, size=37, dtype=np.uint32)
    packed = unit.packed(num_classes)
    assert packed.dtype == np.uint16 and packed.shape == (37, UnitArrays.columns(5, num_classes))
    assert packed.shape[1] == (5 + 5 + 2 if num_classes <= 32768 else 5 + 10 + 2)  # int32 classes take two columns
    back = UnitArrays.unpack(packed, 5, num_classes)
    for name, values in unit.arrays().items():
        got = getattr(back, name)
        assert got.dtype == values.dtype and got.shape == values.shape
        assert np.array_equal(got.view(np.uint8), values.view(np.uint8)), name
    assert (packed[:, -2:].astype(np.uint32) << np.array([0, 16], np.uint32)).sum(1).tolist() == unit.fingerprint.tolist()
    empty = UnitArrays.zeros(0, 5, num_classes).packed(num_classes)  # a unit may hold no view (a tiny shard)
    assert empty.shape == (0, packed.shape[1]) and len(UnitArrays.unpack(empty, 5, num_classes).fingerprint) == 0
    with pytest.raises(ValueError, match="columns"):
        UnitArrays.unpack(packed[:, 1:], 5, num_classes)


def test_a_completion_digest_is_of_little_endian_bytes_on_any_machine():
    from replaykd.layouts import digest

    rows = np.arange(60, dtype=np.uint16).reshape(6, 10) * 1031
    assert digest(rows) == digest(rows.astype(">u2")) == digest(rows.astype("<u2"))
    assert digest(rows) != digest(rows[::-1]) and digest(rows) >> 32 == 1


def test_a_worker_makes_every_even_batch_in_pieces_of_whole_pairs_and_of_a_useful_size():
    from replaykd.loader import WORKER_BATCH, worker_pieces

    for size in range(2, 1025, 2):
        pieces = worker_pieces(size, 2)
        assert sum(pieces) == size and all(p % 2 == 0 for p in pieces), size  # a pair never spans two pieces
        assert max(pieces) <= WORKER_BATCH and min(pieces) >= min(size, 16), (size, pieces)
        assert max(pieces) - min(pieces) <= 2 and len(pieces) == -(-size // WORKER_BATCH)
    for size in range(1, 300):  # a recipe without mixing: any size, single views
        pieces = worker_pieces(size)
        assert sum(pieces) == size and max(pieces) - min(pieces) <= 1 and max(pieces) <= WORKER_BATCH
    assert worker_pieces(134, 2) == [46, 44, 44] and worker_pieces(256, 2) == [64] * 4
