"""The view loaders: one epoch's training views for a rank (stage two, train-teacher), whole units for stage one
(each shard decoded once for all its epochs), evaluation views; and the collation into typed batches.

Items are tuples of views: a mixed pair (kept together, so a batch holds whole pairs) or one view when the recipe
does not mix. Batch sizes count views.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from pipeline.errors import ReplayKDError
from pipeline.manifest import Manifest
from pipeline.plan import EpochPlan, Segment, UnitPlan, unit_size
from pipeline.reader import read_shard
from pipeline.recipe import Recipe
from pipeline.replay import Replayer, View, decode_image
from pipeline.targets import TeacherTargets

Item = tuple[View, ...]
# Runs in the loader worker once per unit: returns a function applied to each of its views (stage two attaches
# the cached targets with it).
Annotator = Callable[[UnitPlan], Callable[[View], None]]


def buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a buffer of `size` items (an item's content does not depend on its order)."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def items_per_batch(batch_size: int, recipe: Recipe) -> int:
    """Items per batch of `batch_size` views; a mixing recipe needs an even batch (pairs stay together)."""
    if recipe.mixes and batch_size % 2:
        raise ReplayKDError(f"--batch-size must be even with recipe {recipe.name}, which mixes views in pairs; "
                            f"got {batch_size}")
    return batch_size // (2 if recipe.mixes else 1)


class _Views(IterableDataset):
    """What both training-view datasets share: the split's shards, and unit items made from a shard's records."""

    def __init__(self, manifest: Manifest, recipe: Recipe, run_seed: int, split: str):
        super().__init__()
        self.manifest, self.recipe, self.run_seed, self.split = manifest, recipe, run_seed, split
        self.shards = manifest.shards(split)
        self.counts = [b - a for a, b in (manifest.shard_range(split, s) for s in self.shards)]
        self._replayer = None

    @property
    def replayer(self) -> Replayer:
        """The replayer, built in the worker process (the transform need not be pickled)."""
        if self._replayer is None:
            self._replayer = Replayer(self.recipe, self.run_seed)
        return self._replayer

    def _unit(self, records, epoch: int, shard_no: int) -> UnitPlan:
        return self.replayer.plan(len(records), epoch, self.shards[shard_no], shard_no)

    def _decode(self, records, positions, shard_no: int) -> dict:
        return {p: decode_image(records[p].data, f"{self.shards[shard_no]}:{records[p].key}") for p in positions}


class ReplayViews(_Views):
    """One epoch's training views for one rank: items of `EpochPlan`'s equal share, decoding only the images the
    share's items show (a decoded image serves all its repeats).

    `epoch` picks the views (a cached epoch), `order_epoch` the order of the shards (the training epoch; default
    `epoch`). `annotate`, if given, runs in the worker once per unit (stage two attaches cached targets there).
    """

    def __init__(self, manifest: Manifest, recipe: Recipe, run_seed: int, epoch: int, split: str = "train",
                 rank: int | None = None, world_size: int | None = None, order_epoch: int | None = None,
                 shuffle_buffer: int = 0, shuffle_seed: int = 0, annotate: Annotator | None = None,
                 fingerprint_every: int = 1):
        super().__init__(manifest, recipe, run_seed, split)
        info = pytorch_worker_info()
        self.rank = info[0] if rank is None else rank
        self.world_size = info[1] if world_size is None else world_size
        self.plan = EpochPlan(self.counts, recipe.repeats, recipe.mixes, run_seed, epoch, order_epoch)
        self.shuffle_buffer, self.shuffle_seed, self.annotate = shuffle_buffer, shuffle_seed, annotate
        self.fingerprint_every = fingerprint_every

    def __len__(self) -> int:
        """Views this rank makes in the epoch (the same on every rank)."""
        return self.plan.rank_items(self.world_size) * self.plan.group

    def batches(self, batch_size: int, workers: int) -> int:
        """Batches of `batch_size` views this rank takes with `workers` loader workers."""
        return self.plan.batches(self.world_size, workers, items_per_batch(batch_size, self.recipe))

    def _items(self, segments: list[Segment]) -> Iterator[Item]:
        for seg in segments:
            records = read_shard(self.manifest, self.split, self.shards[seg.shard_no])
            unit = self._unit(records, seg.epoch, seg.shard_no)
            images = self._decode(records, unit.positions(seg.start, seg.stop), seg.shard_no)
            attach = self.annotate(unit) if self.annotate is not None else None
            for item in self.replayer.items(unit, records, images, seg.start, seg.stop, self.fingerprint_every):
                if attach is not None:
                    for view in item:
                        attach(view)
                yield item

    def __iter__(self) -> Iterator[Item]:
        _, _, worker, workers = pytorch_worker_info()
        items = self._items(self.plan.segments(self.rank, self.world_size, worker, workers))
        if self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.shuffle_seed, self.plan.epoch, self.rank, worker])
            items = buffer_shuffle(items, max(2, self.shuffle_buffer // self.plan.group), rng)
        return items


@dataclass(frozen=True)
class ShardWork:
    """Stage one's work on one shard: the epochs whose units it still needs."""

    shard_no: int
    epochs: tuple[int, ...]


class CacheViews(_Views):
    """Stage one's views: whole units of the given shards, each shard decoded once for all its epochs. Loader
    workers take every num_workers-th shard; the caller gives each rank its own shards."""

    def __init__(self, manifest: Manifest, recipe: Recipe, run_seed: int, work: Sequence[ShardWork],
                 split: str = "train"):
        super().__init__(manifest, recipe, run_seed, split)
        self.work = list(work)

    def __len__(self) -> int:
        return sum(unit_size(self.counts[w.shard_no], self.recipe.repeats, e, self.recipe.mixes)
                   for w in self.work for e in w.epochs)

    def __iter__(self) -> Iterator[Item]:
        _, _, worker, workers = pytorch_worker_info()
        for w in self.work[worker::workers]:
            records = read_shard(self.manifest, self.split, self.shards[w.shard_no])
            images = self._decode(records, range(len(records)), w.shard_no)
            for epoch in w.epochs:
                yield from self.replayer.items(self._unit(records, epoch, w.shard_no), records, images)


@dataclass
class ViewBatch:
    """A collated batch of views: images, label targets, where each view came from, and optional teacher targets.

    `targets` are the mixed, label-smoothed targets lam * y(own) + (1 - lam) * y(partner). `fingerprints` is None
    unless every view of the batch has one; `teacher` is None unless the loader attached cached targets.
    """

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    keys: list[str]
    indices: torch.Tensor
    positions: torch.Tensor
    repeats: torch.Tensor
    slots: torch.Tensor
    shard_nos: torch.Tensor
    epochs: torch.Tensor
    seeds: torch.Tensor
    partners: torch.Tensor
    partner_labels: torch.Tensor
    lams: torch.Tensor
    fingerprints: torch.Tensor | None = None
    teacher: TeacherTargets | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "ViewBatch":
        """A copy with page-locked tensors (the DataLoader calls this when pin_memory is on)."""
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in pinned.items():
            if isinstance(value, torch.Tensor) or isinstance(value, TeacherTargets):
                pinned[name] = value.pin_memory()
        return ViewBatch(**pinned)


class ViewCollate:
    """Stack items' views (a pair's two views stay adjacent) into a `ViewBatch` with the mixed, label-smoothed
    targets."""

    def __init__(self, num_classes: int, smoothing: float):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, items: Sequence[Item]) -> ViewBatch:
        views = [v for item in items for v in item]

        def column(name: str, dtype=torch.int64) -> torch.Tensor:
            return torch.tensor([getattr(v, name) for v in views], dtype=dtype)

        labels, partner_labels, lams = column("label"), column("partner_label"), column("lam", torch.float64)
        off = self.smoothing / self.num_classes
        on = 1.0 - self.smoothing + off
        own = torch.full((len(views), self.num_classes), off).scatter_(1, labels.view(-1, 1), on)
        other = torch.full((len(views), self.num_classes), off).scatter_(1, partner_labels.view(-1, 1), on)
        lam = lams.to(torch.float32).unsqueeze(1)
        fingerprints = None if any(v.fingerprint is None for v in views) else column("fingerprint")
        teacher = None if views[0].teacher is None else TeacherTargets.stack([v.teacher for v in views])
        return ViewBatch(torch.stack([v.image for v in views]), labels, lam * own + (1.0 - lam) * other,
                         [v.key for v in views], column("index"), column("position"), column("repeat"),
                         column("slot"), column("shard_no"), column("epoch"), column("seed"), column("partner"),
                         partner_labels, lams, fingerprints, teacher)


class EvalViews(IterableDataset):
    """Evaluation views of a split (timm's eval transform: resize, centre crop); ranks, then workers, take every
    n-th shard."""

    def __init__(self, manifest: Manifest, recipe: Recipe, split: str = "val", rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        self.manifest, self.split = manifest, split
        self.transform = recipe.eval_transform()
        info = pytorch_worker_info()
        self.rank = info[0] if rank is None else rank
        self.world_size = info[1] if world_size is None else world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(image, label) pairs; the default collate stacks them into (images, labels)."""
        _, _, worker, num_workers = pytorch_worker_info()
        for shard in self.manifest.shards(self.split)[self.rank::self.world_size][worker::num_workers]:
            for r in read_shard(self.manifest, self.split, shard):
                yield self.transform(decode_image(r.data, f"{shard}:{r.key}")), r.label
