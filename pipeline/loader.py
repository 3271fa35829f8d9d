"""The view loader of both stages: shards split across ranks and workers, replayed views, collated batches."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from pipeline.manifest import Manifest
from pipeline.reader import read_shard
from pipeline.recipe import Recipe
from pipeline.replay import Replayer, View, decode_image
from pipeline.targets import TeacherTargets


def split_units(units: Sequence, rank: int, world_size: int, worker: int, num_workers: int) -> list:
    """This (rank, worker)'s share: rank-strided, then worker-strided (webdataset's split_by_node/worker)."""
    return list(units[rank::world_size][worker::num_workers])


def buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a buffer of `size` items (a view's content does not depend on its order)."""
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


@dataclass(frozen=True)
class Unit:
    """A unit of work: one shard of a split, and the epochs to make its views for."""

    shard_no: int
    shard: str
    epochs: tuple[int, ...]


class ReplayViews(IterableDataset):
    """Mixed training views of a split for some epochs, each shard decoded once for all its epochs.

    `units` picks (shard, epochs) work (default: every shard, every epoch); ranks take every
    world_size-th unit and DataLoader workers every num_workers-th of those. `annotate(unit, epoch)`, if given,
    runs in the worker once per shard-epoch and returns a function applied to each of its views (stage two
    attaches the cached targets there). Views stream: at most a few dozen are held at a time.
    """

    def __init__(self, manifest: Manifest, recipe: Recipe, run_seed: int, epochs: Sequence[int],
                 split: str = "train", units: Sequence[Unit] | None = None, rank: int | None = None,
                 world_size: int | None = None, shuffle_buffer: int = 0, shuffle_seed: int = 0,
                 annotate: Callable[[Unit, int], Callable[[View], None]] | None = None, fingerprint_every: int = 1):
        super().__init__()
        self.manifest, self.recipe, self.run_seed, self.split = manifest, recipe, run_seed, split
        shards = manifest.shards(split)
        self.units = list(units) if units is not None else [Unit(i, s, tuple(epochs)) for i, s in enumerate(shards)]
        info = pytorch_worker_info()
        self.rank = info[0] if rank is None else rank
        self.world_size = info[1] if world_size is None else world_size
        self.shuffle_buffer, self.shuffle_seed, self.annotate = shuffle_buffer, shuffle_seed, annotate
        self.fingerprint_every = fingerprint_every
        self._replayer = None

    def rank_units(self) -> list[Unit]:
        """The units this rank makes, over all its workers."""
        return split_units(self.units, self.rank, self.world_size, 0, 1)

    def __len__(self) -> int:
        return sum(len(u.epochs) * self._count(u) for u in self.rank_units())

    def _count(self, unit: Unit) -> int:
        start, stop = self.manifest.shard_range(self.split, unit.shard)
        return stop - start

    def _views(self, units: list[Unit]) -> Iterator[View]:
        if self._replayer is None:  # built in the worker: the transform need not be pickled
            self._replayer = Replayer(self.recipe, self.run_seed)
        for unit in units:
            records = read_shard(self.manifest, self.split, unit.shard)
            images = [decode_image(r.data, f"{unit.shard}:{r.key}") for r in records]
            keys, labels, indices = [r.key for r in records], [r.label for r in records], [r.index for r in records]
            for epoch in unit.epochs:
                attach = self.annotate(unit, epoch) if self.annotate is not None else None
                for view in self._replayer.shard_views(images, keys, labels, indices, epoch, unit.shard,
                                                       unit.shard_no, self.fingerprint_every):
                    if attach is not None:
                        attach(view)
                    yield view

    def __iter__(self) -> Iterator[View]:
        _, _, worker, num_workers = pytorch_worker_info()
        units = split_units(self.units, self.rank, self.world_size, worker, num_workers)
        views = self._views(units)
        if self.shuffle_buffer > 1:
            first_epoch = min(e for u in self.units for e in u.epochs) if self.units else 0
            rng = np.random.default_rng([self.shuffle_seed, first_epoch, self.rank, worker])
            views = buffer_shuffle(views, self.shuffle_buffer, rng)
        return views


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
            if isinstance(value, (torch.Tensor, TeacherTargets)):
                pinned[name] = value.pin_memory()
        return ViewBatch(**pinned)


class ViewCollate:
    """Stack views into a `ViewBatch` and build the mixed, label-smoothed targets."""

    def __init__(self, num_classes: int, smoothing: float):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, views: list[View]) -> ViewBatch:
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
                         [v.key for v in views], column("index"), column("position"), column("shard_no"),
                         column("epoch"), column("seed"), column("partner"), partner_labels, lams, fingerprints,
                         teacher)


class EvalViews(IterableDataset):
    """Evaluation views of a split (timm's eval transform: resize, centre crop), shards split like ReplayViews."""

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
        for shard in split_units(self.manifest.shards(self.split), self.rank, self.world_size, worker, num_workers):
            for r in read_shard(self.manifest, self.split, shard):
                yield self.transform(decode_image(r.data, f"{shard}:{r.key}")), r.label
