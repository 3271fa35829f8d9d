"""Where a batch's teacher targets come from: the cache (read in the loader workers), an online teacher, or none.

Each source is one small class with the same two hooks: `annotator()` runs in the loader workers (only the cache
uses it: it reads each unit once and attaches the rows to the views), and `__call__(batch, images)` runs in the
training loop and returns the batch's `TeacherTargets` on the images' device (or None: labels only).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from pipeline.device import autocast
from pipeline.errors import ReplayKDError
from pipeline.records import TeacherTargets, View, ViewBatch
from pipeline.storage import Location, as_location, is_url

if TYPE_CHECKING:
    from pipeline.cache import UnitArrays
    from pipeline.plan import UnitPlan


class TargetSource:
    """Where a batch's teacher targets come from (the interface of the three sources below)."""

    kind = ""

    def annotator(self) -> Callable | None:
        """A picklable `(unit) -> attach(view)` the loader workers run per unit, or None."""
        return None

    def fingerprint_every(self) -> int:
        """Fingerprint every n-th view in the loader (0: none), for the annotator to check."""
        return 0

    def __call__(self, batch: ViewBatch, images: torch.Tensor) -> TeacherTargets | None:
        """The batch's teacher targets on the images' device."""
        raise NotImplementedError


class NoTargets(TargetSource):
    """No teacher: the student learns from the (mixed, smoothed) labels alone."""

    kind = "labels"

    def __call__(self, batch: ViewBatch, images: torch.Tensor) -> None:
        return None


class OnlineTargets(TargetSource):
    """DeiT's way: the teacher runs on each batch of (mixed) views in the training loop."""

    kind = "online"

    def __init__(self, teacher: torch.nn.Module, topk: int):
        self.teacher, self.topk = teacher, topk

    def __call__(self, batch: ViewBatch, images: torch.Tensor) -> TeacherTargets:
        with torch.no_grad(), autocast(images.device):
            return TeacherTargets.from_logits(self.teacher(images), self.topk)


# Fingerprint checks: every view, one in 16, or none.
CHECK_EVERY = {"all": 1, "sample": 16, "off": 0}


class CachedTargets(TargetSource):
    """Stage two: each view's targets come from the teacher cache, read in the loader workers.

    A worker reads a unit (epoch, shard) once, then for each of its views compares the replayed fingerprint with the
    stored one (a mismatch names the key) and attaches the view's stored rows.
    """

    kind = "cache"

    def __init__(self, store: Location, check: str = "all"):
        self.store, self.every = as_location(str(store)), CHECK_EVERY[getattr(check, "value", check)]

    def annotator(self) -> "CacheReader":
        return CacheReader(self.store)

    def fingerprint_every(self) -> int:
        return self.every

    def __call__(self, batch: ViewBatch, images: torch.Tensor) -> TeacherTargets:
        return batch.teacher.to(images.device)


class CacheReader:
    """The worker side of `CachedTargets`: opens the store in the worker, reads each unit once (ahead of its use,
    from the loader's read-ahead thread, where the store is remote)."""

    def __init__(self, store: Location):
        self.store = as_location(str(store))
        self.remote = is_url(self.store)
        self._cache = None
        self._ahead: dict[tuple[int, int], UnitArrays] = {}

    def _read(self, epoch: int, shard_no: int) -> "UnitArrays":
        from pipeline.cache import TeacherCache

        if self._cache is None:
            self._cache = TeacherCache.open(self.store)
        return self._cache.read_unit(epoch, shard_no)

    def prefetch(self, epoch: int, shard_no: int) -> None:
        """Read a unit before it is needed."""
        self._ahead[epoch, shard_no] = self._read(epoch, shard_no)

    def __call__(self, unit: "UnitPlan") -> Callable[[View], None]:
        data = self._ahead.pop((unit.epoch, unit.shard_no), None)
        if data is None:
            data = self._read(unit.epoch, unit.shard_no)
        probs, classes = torch.from_numpy(data.probs), torch.from_numpy(data.classes)

        def attach(view: View) -> None:
            s = view.slot
            if view.fingerprint is not None and view.fingerprint != data.fingerprint[s]:
                raise ReplayKDError(
                    f"view of key '{view.key}' (epoch {unit.epoch}, shard {unit.shard}, repeat {view.repeat}) does not "
                    f"match the cache: fingerprint {view.fingerprint:08x} replayed, {int(data.fingerprint[s]):08x} "
                    f"stored. The shard, the recipe or the augmentation libraries changed since {self.store} was built")
            view.teacher = TeacherTargets(probs[s], classes[s])

        return attach
