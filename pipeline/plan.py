"""The epoch plan: which views each (epoch, shard) unit holds, how they pair, and which process makes which.

Repeated augmentation (DeiT's RASampler, made balanced). With `repeats` r, epochs form cycles of r. In each cycle a
shard's samples are permuted once and dealt into r parts; in the cycle's j-th epoch each sample of part j appears r
times, as r views with their own seeds. So every sample is seen exactly r times per r epochs (DeiT draws the ~N/r
samples of an epoch at random instead), and an epoch keeps about N views. r = 1 is plain training: every sample
once per epoch.

Pairs for Mixup/CutMix are drawn inside pairing groups, as timm pairs the views of one batch: a unit's chosen
samples are cut into groups of at most PAIR_GROUP samples (sizes within one of each other), and each group's views
(its samples with all their repeats) get a seeded permutation, consecutive pairs, and a fix-up that never leaves a
sample's own repeats as partners while another partner exists. With an odd count the last view is left out, so every
view of a mixing recipe is mixed and batches hold whole pairs. A group's images are all a loader worker needs to
decode to make its pairs, so a unit whose images do not fit the worker's decode budget is still decoded once, group
by group (`pipeline/decoding.py`). A unit's views, group after group in this order, are its slots: the teacher cache
stores one row per slot.

The order of units is reshuffled every epoch, then the epoch's items (pairs, or single views when the recipe does not
mix) are split into equal contiguous ranges, one per rank (the remainder, fewer than `world` items, is left out of
that epoch), and each rank's range into contiguous ranges per loader worker. A pair's views are made together and
stay together in stage two's batches (as timm's Mixup mixes the rows of one batch). Everything here is a pure
function of (run seed, epoch, shard, its size, repeats, mixing): views and pairs never depend on ranks, workers or batch size.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np

from replaykd.errors import ReplayKDError

# Domain tags keep the seed streams of views, pairs, permutations, sample choice, unit order and pairing groups apart.
TAG_VIEW, TAG_PAIR, TAG_PERM, TAG_CHOICE, TAG_ORDER, TAG_GROUP, TAG_ELEM = 1, 2, 3, 4, 5, 6, 7
# Samples of a unit whose views are paired among themselves (with their repeats): a batch's worth of DeiT's views
# per GPU, and ~50 MB of decoded ImageNet photographs, well within a loader worker's decode budget.
PAIR_GROUP = 64


def derive_seed(run_seed: int, epoch: int, tag: int, *names: str) -> int:
    """A 32-bit seed: BLAKE2b of (run seed, epoch, tag, names), a counter-based derivation (no state)."""
    if run_seed < 0 or epoch < 0:
        raise ReplayKDError(f"seed and epoch must be >= 0, got seed {run_seed}, epoch {epoch}")
    msg = struct.pack("<QQI", run_seed, epoch, tag) + b"\0".join(n.encode() for n in names)
    return int.from_bytes(hashlib.blake2b(msg, digest_size=4).digest(), "little")


@dataclass(frozen=True)
class Slot:
    """One view of a unit: the sample's position in its shard and which of its repeats this is."""

    position: int
    repeat: int


def chosen_positions(n: int, repeats: int, run_seed: int, epoch: int, shard: str) -> list[int]:
    """The positions of a shard of `n` samples that appear in `epoch` (each `repeats` times), in no set order."""
    if repeats == 1:
        return list(range(n))
    cycle, phase = divmod(epoch, repeats)
    perm = np.random.default_rng(derive_seed(run_seed, cycle, TAG_CHOICE, shard)).permutation(n)
    return perm[phase::repeats].tolist()


def unit_size(n: int, repeats: int, epoch: int, paired: bool) -> int:
    """How many views (slots) the unit of a shard of `n` samples holds in `epoch` (without building it)."""
    views = repeats * len(range(epoch % repeats, n, repeats))
    return views - (views % 2 if paired else 0)  # only the last pairing group can hold an odd number of views


def max_unit_size(n: int, repeats: int, paired: bool) -> int:
    """The most views a unit of this shard holds in any epoch."""
    return max(unit_size(n, repeats, e, paired) for e in range(repeats))


def pair_up(views: list[Slot], rng: np.random.Generator) -> list[Slot]:
    """Permute `views` and pair them consecutively, (2i, 2i+1), leaving out the last of an odd count; a pair of one
    sample's own repeats swaps a member with another pair that holds neither (one exists while the unit holds two
    samples), which fixes it without breaking that other pair."""
    order = [views[i] for i in rng.permutation(len(views))]
    order = order[: len(order) - len(order) % 2]
    for i in range(0, len(order), 2):
        s = order[i].position
        if order[i + 1].position != s:
            continue
        for j in chain(range(i + 2, len(order), 2), range(0, i, 2)):
            if order[j].position != s and order[j + 1].position != s:
                order[i + 1], order[j] = order[j], order[i + 1]
                break
    return order


@dataclass(frozen=True)
class UnitPlan:
    """The views of one (epoch, shard) unit, in slot order; when `paired`, slots 2i and 2i+1 are mixed together."""

    epoch: int
    shard_no: int
    shard: str
    slots: tuple[Slot, ...]
    paired: bool
    group_ends: tuple[int, ...] = ()  # paired: the item just after each pairing group's last pair

    def __post_init__(self):
        if self.paired and self.slots and (not self.group_ends or self.group_ends[-1] != self.items):
            raise ValueError(f"a paired unit's pairing groups must end at its {self.items} items: {self.group_ends}")

    def pairing_group(self, item: int) -> int:
        """Which pairing group of the unit a pair (`item`) was drawn in."""
        return bisect.bisect_right(self.group_ends, item)

    @property
    def group(self) -> int:
        """Views per item: 2 (a mixed pair) or 1."""
        return 2 if self.paired else 1

    @property
    def items(self) -> int:
        """How many items (pairs or single views) the unit holds."""
        return len(self.slots) // self.group

    def item_slots(self, item: int) -> range:
        """The slots of one item."""
        return range(item * self.group, (item + 1) * self.group)

    def positions(self, start: int = 0, stop: int | None = None) -> list[int]:
        """The distinct sample positions that items [start, stop) show (the images to decode)."""
        stop = self.items if stop is None else stop
        return sorted({self.slots[s].position for s in range(start * self.group, stop * self.group)})


def _group_bounds(count: int) -> list[int]:
    """Where a unit's `count` chosen samples are cut into pairing groups: the fewest groups of about PAIR_GROUP,
    near-equal, each of an even size but the last (so that, as without groups, at most one view is left out)."""
    parts = max(1, -(-count // PAIR_GROUP))
    return [2 * split_range(count // 2, parts, i)[0] for i in range(parts)] + [count]


def pairing_groups(positions: list[int]) -> list[list[int]]:
    """`positions` cut, in order, into pairing groups."""
    bounds = _group_bounds(len(positions))
    return [positions[a:b] for a, b in zip(bounds, bounds[1:])]


def plan_unit(n: int, repeats: int, paired: bool, run_seed: int, epoch: int, shard: str, shard_no: int) -> UnitPlan:
    """The unit of shard `shard` (n samples) in `epoch`: its chosen samples, their repeats, paired within groups."""
    chosen = chosen_positions(n, repeats, run_seed, epoch, shard)
    rng = np.random.default_rng(derive_seed(run_seed, epoch, TAG_PERM, shard))
    if not paired:
        views = [Slot(p, r) for p in chosen for r in range(repeats)]
        return UnitPlan(epoch, shard_no, shard, tuple(views[i] for i in rng.permutation(len(views))), paired)
    groups = [pair_up([Slot(p, r) for p in group for r in range(repeats)], rng) for group in pairing_groups(chosen)]
    ends = tuple(itertools.accumulate(len(pairs) // 2 for pairs in groups))
    return UnitPlan(epoch, shard_no, shard, tuple(s for pairs in groups for s in pairs), paired, ends)


@dataclass(frozen=True)
class Segment:
    """Items [start, stop) of one (epoch, shard) unit: a piece of work for one loader worker."""

    epoch: int
    shard_no: int
    start: int
    stop: int


def unit_order(num_units: int, run_seed: int, epoch: int) -> list[int]:
    """The order of a split's shards in `epoch`: a fresh permutation every epoch."""
    return np.random.default_rng(derive_seed(run_seed, epoch, TAG_ORDER)).permutation(num_units).tolist()


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """Part `index` of [0, total) cut into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


class EpochPlan:
    """Who makes which items of an epoch: shards in a per-epoch order, equal contiguous ranges per rank, then per
    worker. `order_epoch` seeds the order (the training epoch); `epoch` picks the views (the cached epoch).

    With a batch size, a rank keeps only whole batches (as DeiT drops the last partial batch) and each loader worker
    gets whole batches, so every rank takes the same number of full steps whatever its worker count."""

    def __init__(self, counts: Sequence[int], repeats: int, paired: bool, run_seed: int, epoch: int,
                 order_epoch: int | None = None):
        self.epoch, self.group = epoch, 2 if paired else 1
        self.items = [unit_size(n, repeats, epoch, paired) // self.group for n in counts]
        self.order = unit_order(len(counts), run_seed, epoch if order_epoch is None else order_epoch)
        self.total = sum(self.items)

    def rank_items(self, world: int) -> int:
        """Items every rank may make (equal for all ranks; the last `total % world` items are left out)."""
        return self.total // world

    def batches(self, world: int, batch_size: int) -> int:
        """Full batches of `batch_size` views each rank takes in this epoch."""
        return self.rank_items(world) * self.group // batch_size

    def segments(self, rank: int, world: int, worker: int = 0, workers: int = 1,
                 batch_size: int | None = None) -> list[Segment]:
        """This (rank, worker)'s pieces of units, in order: its share of the rank's whole batches (all the rank's
        items when `batch_size` is None)."""
        per_rank = self.rank_items(world)
        if batch_size is None:
            w0, w1 = split_range(per_rank, workers, worker)
        else:
            per_batch = batch_size // self.group
            b0, b1 = split_range(self.batches(world, batch_size), workers, worker)
            w0, w1 = b0 * per_batch, b1 * per_batch
        lo, hi = rank * per_rank + w0, rank * per_rank + w1
        out, offset = [], 0
        for shard_no in self.order:
            n = self.items[shard_no]
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                out.append(Segment(self.epoch, shard_no, a - offset, b - offset))
            offset += n
        return out
