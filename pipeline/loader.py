"""The view loader of both stages: shards split across ranks and workers, replayed views, collated batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate
from webdataset.utils import pytorch_worker_info

from pipeline.manifest import Manifest
from pipeline.reader import read_shard
from pipeline.recipe import Recipe
from pipeline.replay import Replayer, decode_image


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
                 annotate: Callable[[Unit, int], Callable[[dict], None]] | None = None, fingerprint_every: int = 1):
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

    def _views(self, units: list[Unit]) -> Iterator[dict]:
        if self._replayer is None:  # built in the worker: the transform need not be pickled
            self._replayer = Replayer(self.recipe, self.run_seed)
        for unit in units:
            records = read_shard(self.manifest, self.split, unit.shard)
            images = [decode_image(r.data, f"{unit.shard}:{r.key}") for r in records]
            keys, labels, indices = [r.key for r in records], [r.label for r in records], [r.index for r in records]
            for epoch in unit.epochs:
                attach = self.annotate(unit, epoch) if self.annotate is not None else None
                for item in self._replayer.shard_views(images, keys, labels, indices, epoch, unit.shard,
                                                       self.fingerprint_every):
                    item["shard_no"] = unit.shard_no
                    if attach is not None:
                        attach(item)
                    yield item

    def __iter__(self) -> Iterator[dict]:
        _, _, worker, num_workers = pytorch_worker_info()
        units = split_units(self.units, self.rank, self.world_size, worker, num_workers)
        views = self._views(units)
        if self.shuffle_buffer > 1:
            first_epoch = min(e for u in self.units for e in u.epochs) if self.units else 0
            rng = np.random.default_rng([self.shuffle_seed, first_epoch, self.rank, worker])
            views = buffer_shuffle(views, self.shuffle_buffer, rng)
        return views


class ViewCollate:
    """Stack views and build the mixed, label-smoothed targets: lam * y(own) + (1 - lam) * y(partner).

    Cached teacher rows (float16 probabilities, int16/32 classes) are stacked once per batch as float32/int64.
    """

    def __init__(self, num_classes: int, smoothing: float):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, items: list[dict]) -> dict:
        teacher = {}
        if "t_probs" in items[0]:
            teacher["t_probs"] = torch.from_numpy(np.stack([it.pop("t_probs") for it in items]).astype(np.float32))
            teacher["t_classes"] = torch.from_numpy(np.stack([it.pop("t_classes") for it in items]).astype(np.int64))
        batch = default_collate(items)
        batch.update(teacher)
        off = self.smoothing / self.num_classes
        on = 1.0 - self.smoothing + off
        lam = batch["lam"].to(torch.float32).unsqueeze(1)
        own = torch.full((len(items), self.num_classes), off).scatter_(1, batch["label"].view(-1, 1), on)
        other = torch.full((len(items), self.num_classes), off).scatter_(1, batch["partner_label"].view(-1, 1), on)
        batch["target"] = lam * own + (1.0 - lam) * other
        return batch


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

    def __iter__(self) -> Iterator[dict]:
        _, _, worker, num_workers = pytorch_worker_info()
        for shard in split_units(self.manifest.shards(self.split), self.rank, self.world_size, worker, num_workers):
            for r in read_shard(self.manifest, self.split, shard):
                yield {"image": self.transform(decode_image(r.data, f"{shard}:{r.key}")), "label": r.label, "index": r.index}
