"""The epoch plan: balanced repeated augmentation, pairing, per-epoch order, equal ranks (pure functions, fast)."""
from __future__ import annotations

from collections import Counter

import pytest

from replaykd.plan import (
    PAIR_GROUP,
    EpochPlan,
    chosen_positions,
    max_unit_size,
    pairing_groups,
    plan_unit,
    split_range,
    unit_order,
    unit_size,
)


@pytest.mark.parametrize("n, repeats", [(200, 3), (37, 3), (10, 4), (5, 1), (1, 3)])
def test_every_sample_exactly_repeats_times_per_repeats_epochs(n, repeats):
    for cycle in range(3):
        seen = Counter()
        for epoch in range(cycle * repeats, (cycle + 1) * repeats):
            unit = plan_unit(n, repeats, False, 7, epoch, "train-000001.tar", 1)
            assert len(unit.slots) == unit_size(n, repeats, epoch, False) <= max_unit_size(n, repeats, False)
            seen.update(s.position for s in unit.slots)
            per_sample = Counter(s.position for s in unit.slots)
            assert set(per_sample.values()) <= {repeats}  # a chosen sample shows all its repeats in its epoch
            assert {(s.position, s.repeat) for s in unit.slots} == {(p, r) for p in per_sample for r in range(repeats)}
        assert seen == {p: repeats for p in range(n)}
    # the choice changes from cycle to cycle
    if repeats > 1 and n > 10:
        assert chosen_positions(n, repeats, 7, 0, "s") != chosen_positions(n, repeats, 7, repeats, "s")


@pytest.mark.parametrize("n, repeats", [(200, 3), (37, 3), (2, 3), (9, 2), (101, 1)])
def test_pairs_never_hold_one_samples_own_repeats(n, repeats):
    for epoch in range(12):
        unit = plan_unit(n, repeats, True, epoch, epoch, f"shard-{epoch}", 0)
        views = repeats * len(chosen_positions(n, repeats, epoch, epoch, f"shard-{epoch}"))
        assert len(unit.slots) == views - views % 2 == unit_size(n, repeats, epoch, True)
        assert len(set(unit.slots)) == len(unit.slots)
        samples = {s.position for s in unit.slots}
        for i in range(0, len(unit.slots), 2):
            a, b = unit.slots[i], unit.slots[i + 1]
            assert a.position != b.position or len(samples) == 1


@pytest.mark.parametrize("n, repeats", [(1000, 3), (1000, 1), (200, 3), (65, 1), (131, 1)])
def test_pairs_lie_inside_pairing_groups_of_about_64_samples(n, repeats):
    for epoch in range(3):
        chosen = chosen_positions(n, repeats, 5, epoch, "s")
        groups = pairing_groups(chosen)
        assert [p for g in groups for p in g] == chosen
        assert max(map(len, groups)) <= PAIR_GROUP + 1 and max(map(len, groups)) - min(map(len, groups)) <= 3
        assert all(len(g) % 2 == 0 for g in groups[:-1])  # so at most one view of the unit is left out
        group_of = {p: i for i, g in enumerate(groups) for p in g}
        unit = plan_unit(n, repeats, True, 5, epoch, "s", 0)
        assert len(unit.slots) == unit_size(n, repeats, epoch, True) >= len(chosen) * repeats - 1
        for i in range(0, len(unit.slots), 2):
            assert group_of[unit.slots[i].position] == group_of[unit.slots[i + 1].position]
        # the slots are the groups one after the other: a worker's range of items needs few groups' images
        assert [group_of[s.position] for s in unit.slots] == sorted(group_of[s.position] for s in unit.slots)


def test_pairs_are_random_not_fixed():
    partners = set()
    for epoch in range(6):
        unit = plan_unit(200, 3, True, 0, epoch, "s", 0)
        partners |= {(unit.slots[i].position, unit.slots[i + 1].position) for i in range(0, len(unit.slots), 2)}
    assert len(partners) > 500


def test_unit_order_is_fresh_every_epoch():
    orders = {tuple(unit_order(20, 3, epoch)) for epoch in range(10)}
    assert len(orders) == 10 and all(sorted(o) == list(range(20)) for o in orders)


def test_split_range_covers_in_near_equal_parts():
    for total, parts in ((10, 3), (3, 5), (0, 2), (100, 7)):
        ranges = [split_range(total, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (2, 3), (3, 2), (8, 4)])
def test_ranks_take_equal_shares_of_an_epoch(world, workers):
    counts = [200, 200, 200, 200, 37]  # five uneven shards
    plan = EpochPlan(counts, 3, True, 5, 4)
    taken = Counter()
    per_rank = []
    for rank in range(world):
        items = 0
        for worker in range(workers):
            for seg in plan.segments(rank, world, worker, workers):
                assert 0 <= seg.start < seg.stop <= plan.items[seg.shard_no]
                taken.update((seg.shard_no, i) for i in range(seg.start, seg.stop))
                items += seg.stop - seg.start
        per_rank.append(items)
    assert len(set(per_rank)) == 1 and per_rank[0] == plan.total // world
    assert max(taken.values()) == 1 and plan.total - len(taken) == plan.total % world < world


@pytest.mark.parametrize("world, workers, batch", [(1, 1, 16), (2, 3, 16), (3, 2, 64), (8, 4, 32), (2, 5, 256)])
def test_every_rank_takes_the_same_full_batches_whatever_its_workers(world, workers, batch):
    counts = [200, 200, 200, 200, 37]
    plan = EpochPlan(counts, 3, True, 5, 4)
    full = plan.batches(world, batch)
    assert full == plan.rank_items(world) * plan.group // batch > 0
    for rank in range(world):
        views = []
        for worker in range(workers):
            mine = sum(seg.stop - seg.start for seg in plan.segments(rank, world, worker, workers, batch)) * plan.group
            assert mine % batch == 0  # each worker's share is whole batches: no partial batch anywhere
            views.append(mine)
        assert sum(views) == full * batch  # as DeiT: only the last, partial batch of the rank's share is dropped
        assert plan.rank_items(world) * plan.group - sum(views) < batch
