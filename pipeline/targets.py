"""Where a batch's teacher targets come from: the cache (read in the loader workers), an online teacher, or none.

Each source is one small class with the same two hooks: `annotator()` runs in the loader workers (only the cache
uses it: it reads each unit once and attaches the rows to the views), and `__call__(batch, images)` runs where a
batch is finished (`ReplayLoader.finish`) and returns the batch's `TeacherTargets` on the images' device (or None:
labels only). Several
caches, or several online teachers, make one teacher: a `TeacherEnsemble` of their targets and weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from replaykd.device import autocast
from replaykd.errors import ReplayKDError
from replaykd.records import TeacherEnsemble, TeacherRecord, TeacherTargets, View, ViewBatch
from replaykd.storage import Location, as_location, is_url

if TYPE_CHECKING:
    from replaykd.cache import UnitArrays
    from replaykd.manifest import Manifest
    from replaykd.plan import UnitPlan
    from replaykd.recipe import Recipe

# How far several teachers' weights may sum from 1.
WEIGHT_TOLERANCE = 1e-6


class TargetSource:
    """Where a batch's teacher targets come from (the interface of the three sources below)."""

    kind = ""
    records: tuple[TeacherRecord, ...] = ()  # who the teachers are, as a run's files name them

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
    """DeiT's way: the teacher runs on each batch of (mixed) views in the training loop. Several teachers make an
    ensemble, each truncated to its own top-k as its cache would store it, weighted by `weights` (default: equal).
    A teacher takes the views as they are finished (the recipe's normalisation and size): wrap a timm model in
    `replaykd.teacher.Teacher` for its own preprocessing. `records` name the teachers for a run's files."""

    kind = "online"

    def __init__(self, teachers: Sequence[torch.nn.Module], topks: Sequence[int],
                 weights: Sequence[float] | None = None, records: Sequence[TeacherRecord] = ()):
        if not teachers or len(topks) != len(teachers):
            raise ReplayKDError(f"online targets need one k per teacher: {len(teachers)} teachers, {len(topks)} k")
        self.teachers, self.topks = list(teachers), list(topks)
        self.weights, self.records = teacher_weights(weights, len(self.teachers)), tuple(records)

    def __call__(self, batch: ViewBatch, images: torch.Tensor) -> TeacherTargets | TeacherEnsemble:
        with torch.no_grad(), autocast(images.device):
            rows = tuple(TeacherTargets.from_logits(t(images), k) for t, k in zip(self.teachers, self.topks))
        return rows[0] if len(rows) == 1 else TeacherEnsemble(rows, self.weights)


def teacher_weights(weights: Sequence[float] | None, teachers: int) -> tuple[float, ...]:
    """Each teacher's weight in the mean: as given (one per teacher, none negative, summing to 1), else equal."""
    if weights is None:
        return (1.0 / teachers,) * teachers
    weights = tuple(float(w) for w in weights)
    if len(weights) != teachers or min(weights) < 0 or abs(sum(weights) - 1.0) > WEIGHT_TOLERANCE:
        raise ReplayKDError(f"teacher weights {list(weights)} must be {teachers} numbers, one per teacher, none "
                            "negative, summing to 1")
    return weights


def _locations(stores: Location | Sequence[Location]) -> list[Location]:
    """One store or several, as a list."""
    many = isinstance(stores, Sequence) and not isinstance(stores, str)
    return [as_location(str(s)) for s in (stores if many else [stores])]


# Fingerprint checks: every view, one in 16, or none.
CHECK_EVERY = {"all": 1, "sample": 16, "off": 0}


class CachedTargets(TargetSource):
    """Stage two: each view's targets come from the teacher cache, read in the loader workers.

    A worker reads a unit (epoch, shard) once, then for each of its views compares the replayed fingerprint with the
    stored one (a mismatch names the key) and attaches the view's stored rows. With several caches (an ensemble)
    every cache's fingerprint is compared, and a view's rows from all of them travel side by side as one row of
    k1 + k2 + ... columns (one tensor through the loader, as for one cache), split again here.
    """

    kind = "cache"

    def __init__(self, stores: Location | Sequence[Location], check: str = "all",
                 weights: Sequence[float] | None = None):
        self.stores = _locations(stores)
        if not self.stores:
            raise ReplayKDError("no teacher cache given: pass one store (or several)")
        self.every = CHECK_EVERY[getattr(check, "value", check)]
        self.weights = teacher_weights(weights, len(self.stores))
        caches = self._open()
        self.topks = [c.config.topk for c in caches]  # each cache's k, to split a view's rows again
        self.epochs = min(c.config.epochs for c in caches)  # the epochs of views all of them hold
        self.records = tuple(TeacherRecord(c.config.teacher["name"], c.attrs.get("checkpoint_path"),
                                            c.config.teacher["sha256"], str(c.path), c.config.topk, w)
                              for c, w in zip(caches, self.weights))

    def _open(self) -> list:
        # opened where needed, not kept: the loader's worker processes, forked later, have no use for them
        from replaykd.cache import TeacherCache

        return [TeacherCache.open(s) for s in self.stores]

    def require(self, manifest: "Manifest", split: str, recipe: "Recipe", seed: int, epochs: int | None = None,
                reuse_epochs: bool = False) -> None:
        """Refuse, naming the store and what differs, caches that do not hold this run's views: another data set,
        split, recipe or seed, fewer than `epochs` epochs (unless `reuse_epochs` cycles them), or an unfinished
        unit."""
        from replaykd.cache import CacheRequest

        caches = self._open()
        if epochs is not None and epochs > self.epochs and not reuse_epochs:
            fewest = min(caches, key=lambda c: c.config.epochs)
            common = " (a run uses the epochs all its caches hold)" if len(caches) > 1 else ""
            raise ReplayKDError(f"{epochs} epochs asked for but {fewest.path} holds {self.epochs}{common}; grow the "
                                "cache (teacher-cache --epochs N) or cycle the cached epochs (--reuse-epochs; "
                                "reuse_epochs=True in the API)")
        request = CacheRequest.of(manifest, split, recipe, seed)
        for cache in caches:
            cache.require(request, epochs=min(epochs or self.epochs, self.epochs), complete=True)

    def annotator(self) -> "CacheReader":
        return CacheReader(self.stores)

    def fingerprint_every(self) -> int:
        return self.every

    def __call__(self, batch: ViewBatch, images: torch.Tensor) -> TeacherTargets | TeacherEnsemble:
        rows = batch.teacher.to(images.device)
        if len(self.stores) == 1:
            return rows
        members = zip(rows.probs.split(self.topks, dim=1), rows.classes.split(self.topks, dim=1))
        return TeacherEnsemble(tuple(TeacherTargets(p, c) for p, c in members), self.weights)


class CacheReader:
    """The worker side of `CachedTargets`: opens the stores in the worker, reads each unit of each once (ahead of
    its use, from the loader's read-ahead thread, where a store is remote)."""

    def __init__(self, stores: Location | Sequence[Location]):
        self.stores = _locations(stores)
        self.remote = any(is_url(s) for s in self.stores)
        self._caches = None
        self._ahead: dict[tuple[int, int], list[UnitArrays]] = {}

    def _read(self, epoch: int, shard_no: int) -> list["UnitArrays"]:
        from replaykd.cache import TeacherCache

        if self._caches is None:
            self._caches = [TeacherCache.open(s) for s in self.stores]
        return [cache.read_unit(epoch, shard_no) for cache in self._caches]

    def prefetch(self, epoch: int, shard_no: int) -> None:
        """Read a unit before it is needed."""
        self._ahead[epoch, shard_no] = self._read(epoch, shard_no)

    def __call__(self, unit: "UnitPlan") -> Callable[[View], None]:
        units = self._ahead.pop((unit.epoch, unit.shard_no), None)
        if units is None:
            units = self._read(unit.epoch, unit.shard_no)
        probs = [torch.from_numpy(data.probs) for data in units]
        classes = [torch.from_numpy(data.classes) for data in units]
        probs, classes = (probs[0], classes[0]) if len(units) == 1 else (torch.cat(probs, 1), torch.cat(classes, 1))
        # rows and fingerprints made once per unit, as Python objects: attach runs once per view, and at small image
        # sizes tensor indexing and numpy scalar comparisons per view were a visible share of a worker's time
        probs, classes = probs.unbind(), classes.unbind()
        stored = [data.fingerprint.tolist() for data in units]

        def attach(view: View) -> None:
            s = view.slot
            for store, fingerprints in zip(self.stores, stored):
                if view.fingerprint is not None and view.fingerprint != fingerprints[s]:
                    raise ReplayKDError(
                        f"view of key '{view.key}' (epoch {unit.epoch}, shard {unit.shard}, repeat {view.repeat}) does "
                        f"not match the cache {store}: fingerprint {view.fingerprint:08x} replayed, "
                        f"{fingerprints[s]:08x} stored. The shard, the recipe or the augmentation libraries "
                        f"changed since {store} was built")
            view.teacher = TeacherTargets(probs[s], classes[s])

        return attach
