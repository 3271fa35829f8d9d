"""`ReplayLoader`: stage two's data side as one object a training loop iterates, as it would a DataLoader.

Each batch holds a rank's replayed views of the epoch, finished on the device (normalised, erased, mixed), their
mixed and label-smoothed targets, and the teacher's targets: read from one cache or several (weighted), run online,
or none. `replaykd train-student` and `train-teacher` train through it; any other loop can:

    loader = ReplayLoader("data/in1k", "deit", "caches/in1k.zarr", batch_size=128, epochs=300)
    for epoch in range(300):
        loader.set_epoch(epoch)
        for batch in loader:
            parts = loss(model(batch.images), batch.targets, batch.teacher)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from replaykd.device import pick_device
from replaykd.errors import ReplayKDError
from replaykd.finish import Finisher
from replaykd.loader import (
    DECODE_MEMORY,
    Batched,
    EvalViews,
    ReplayViews,
    ViewCollate,
    loader_settings,
    regroup,
    shuffle_views,
    stop_workers,
)
from replaykd.manifest import Manifest
from replaykd.recipe import Recipe
from replaykd.records import TeacherRecord, TrainBatch, ViewBatch
from replaykd.storage import Location
from replaykd.targets import CachedTargets, NoTargets, TargetSource


class ReplayLoader:
    """A rank's training batches, epoch by epoch: the views stage one's teacher saw, bit for bit, with its targets.

    `manifest`: a data set folder or URL (or a loaded `Manifest`); `recipe`: a built-in recipe's name, a YAML file or
    a `Recipe`; `cache`: one teacher cache (folder or URL) or several, whose targets are mixed with `cache_weights`
    (default: equal). Each cache must hold this data set's `split`, the recipe's views and `seed`, every unit of
    `epochs` epochs (fewer with `reuse_epochs`, which cycles them); one that does not is refused by name. Without a
    cache, `targets` gives another source (`OnlineTargets`: a teacher run on each batch), else labels only.
    `check_fingerprints` ('all', 'sample' or 'off') compares replayed views with the ones the cache stored.

    `rank`/`world_size` (default: torch.distributed's, or the RANK and WORLD_SIZE variables) split each epoch into
    equal whole batches of `batch_size` views per rank; `workers` loader processes (kept from epoch to epoch) make
    them, `prefetch` batches ahead each; `device` ('auto', 'cpu', 'cuda', ...) is where batches are finished.
    `shuffle_seed` orders the views within a worker's buffer of `shuffle_buffer` views (default: what 32 MB holds, at
    most 1024); `decode_memory` bounds a worker's decoded images (bytes).
    """

    def __init__(self, manifest: Location | Manifest, recipe: str | Path | Recipe = "deit",
                 cache: Location | Sequence[Location] | None = None, *, batch_size: int = 256,
                 epochs: int | None = None, seed: int = 0, split: str = "train",
                 cache_weights: Sequence[float] | None = None, check_fingerprints: str = "all",
                 reuse_epochs: bool = False, targets: TargetSource | None = None, rank: int | None = None,
                 world_size: int | None = None, workers: int = 4, prefetch: int = 2,
                 device: str | torch.device = "auto", shuffle_seed: int = 0, shuffle_buffer: int | None = None,
                 decode_memory: int = DECODE_MEMORY):
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        if batch_size < 1:
            raise ReplayKDError(f"batch_size must be at least 1, got {batch_size}")
        if cache is not None:
            if targets is not None:
                raise ReplayKDError("the teacher's targets come from `cache` or from `targets`, not both")
            source = CachedTargets(cache, check_fingerprints, cache_weights)
            source.require(self.manifest, split, self.recipe, seed, epochs, reuse_epochs)
            view_epochs = source.epochs
        else:
            for name, given in (("cache_weights", cache_weights), ("reuse_epochs", reuse_epochs or None)):
                if given is not None:
                    raise ReplayKDError(f"{name} applies to cached targets: pass `cache`")
            source, view_epochs = targets or NoTargets(), None
        self.source = source
        self.teachers: tuple[TeacherRecord, ...] = source.records
        self.batch_size, self.workers, self.prefetch, self.shuffle_seed = batch_size, workers, prefetch, shuffle_seed
        self.dataset = ReplayViews(self.manifest, self.recipe, seed, 0, split, rank=rank, world_size=world_size,
                                   view_epochs=view_epochs, shuffle_buffer=shuffle_views(self.recipe, shuffle_buffer),
                                   shuffle_seed=shuffle_seed, annotate=source.annotator(),
                                   fingerprint_every=source.fingerprint_every(), batch_size=batch_size,
                                   decode_memory=decode_memory)
        self._finisher = Finisher(self.recipe)
        self._eval_loaders: list[DataLoader] = []  # stopped with this loader
        self._loader = DataLoader(Batched(self.dataset, batch_size, ViewCollate(self.manifest.num_classes,
                                                                                self.recipe.smoothing)),
                                  batch_size=None, **loader_settings(workers, prefetch, self.device, shuffle_seed))
        self._start = 0

    @property
    def num_classes(self) -> int:
        """The data set's class count (the width of `batch.targets`)."""
        return self.manifest.num_classes

    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields."""
        return self.dataset.epoch

    def view_epoch(self, epoch: int | None = None) -> int:
        """The epoch of views a training epoch (default: the current one) shows: the cached epoch it replays."""
        return self.dataset.plan(epoch).epoch

    @property
    def view_epochs(self) -> int | None:
        """Epochs of views the caches hold (training epoch e shows cached epoch e % view_epochs); None: every epoch
        its own."""
        return self.dataset.view_epochs

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Make the next iteration yield `epoch`'s batches from its `step`-th on (a run resumed within an epoch).
        The skipped batches are still made by the workers, and dropped before they are finished on the device."""
        steps = self.steps(epoch)
        if not 0 <= step <= steps:
            raise ReplayKDError(f"step {step} is outside epoch {epoch}, which has {steps} steps")
        self.dataset.set_epoch(epoch)
        self._start = step

    def steps(self, epoch: int | None = None) -> int:
        """Full batches (optimiser steps) of an epoch (default: the current one), the same on every rank."""
        return self.dataset.batches(epoch)

    def steps_per_epoch(self, epochs: int) -> list[int]:
        """The steps of epochs 0 .. epochs-1, what a per-step learning-rate schedule needs."""
        return [self.steps(e) for e in range(epochs)]

    def views(self, epoch: int | None = None) -> int:
        """Views this rank takes in an epoch (default: the current one)."""
        return self.dataset.views(epoch)

    def __len__(self) -> int:
        """Batches the next iteration yields."""
        return self.steps() - self._start

    def __iter__(self) -> Iterator[TrainBatch]:
        """The current epoch's batches (from the step `set_epoch` gave), finished on the device."""
        skip, self._start = self._start, 0
        for n, views in enumerate(regroup(self._loader, self.batch_size)):
            if n >= skip:
                yield self.finish(views)

    def finish(self, views: ViewBatch) -> TrainBatch:
        """A uint8 batch from the loader workers as a training step takes it, on the device."""
        images = self._finisher(views, self.device)
        return TrainBatch(images, views.targets.to(self.device, non_blocking=True), self.source(views, images), views)

    def eval_loader(self, split: str = "val", batch_size: int | None = None, workers: int | None = None
                    ) -> DataLoader | None:
        """(images, labels) batches of `split` ('val' is 'validation' where the manifest names it so) through the
        recipe's evaluation transform, this rank's share of its shards; None for split 'none'."""
        split = self.manifest.eval_split(split, "split")
        if split is None:
            return None
        views = EvalViews(self.manifest, self.recipe.eval_transform(), split, self.dataset.rank,
                          self.dataset.world_size)
        loader = DataLoader(views, batch_size=batch_size or self.batch_size,
                            **loader_settings(min(self.workers, 2) if workers is None else workers, self.prefetch,
                                              self.device, self.shuffle_seed))
        self._eval_loaders.append(loader)
        return loader

    def close(self) -> None:
        """Stop the worker processes of this loader and of its evaluation loaders now (they are also stopped when
        the loaders are collected)."""
        stop_workers(self._loader, *self._eval_loaders)

    def __enter__(self) -> "ReplayLoader":
        """The loader itself; leaving the `with` block closes it."""
        return self

    def __exit__(self, *exc) -> None:
        """Close the loader."""
        self.close()
