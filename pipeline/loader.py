"""The view loaders: one epoch's training views for a rank (stage two, train-teacher), whole units for stage one
(each shard decoded once for all its epochs), evaluation views; and the collation into typed batches.

A pair's two views are made together (they share the mix) and stay together through the shuffle, so that a batch
holds both, each image once, as timm's Mixup mixes the rows of one batch: half the pixels a batch would carry if
each view brought its partner's along (what a view does only where its partner falls in another batch).
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import multiprocessing
import os
import signal
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.utils import pytorch_worker_info

from replaykd.decoding import DecodedImages, decoded_size, steps_for
from replaykd.errors import ReplayKDError
from replaykd.manifest import Manifest
from replaykd.plan import EpochPlan, Segment, UnitPlan, split_range
from replaykd.reader import read_ahead, read_shard
from replaykd.recipe import Recipe
from replaykd.records import FILL_ZERO, Erase, TeacherTargets, View, ViewBatch
from replaykd.replay import Replayer, decode_image
from replaykd.storage import is_url

# Runs in the loader worker once per unit: returns a function applied to each of its views (stage two attaches
# the cached targets with it).
Annotator = Callable[[UnitPlan], Callable[[View], None]]


_END = object()
# Bytes of decoded images a loader worker holds at most (see pipeline/decoding.py), and of views in its shuffle
# buffer when the buffer's size is not given.
DECODE_MEMORY = 96 << 20
WORKER_BATCH = 64
SHUFFLE_MEMORY = 32 << 20


def shuffle_views(recipe: Recipe, given: int | None) -> int:
    """The shuffle buffer's size in views: as given, else 1024, or as many as fit in SHUFFLE_MEMORY where views are
    large (a 224 px view carries ~150 KB of pixels: a mixed pair travels as one item of two views and two images)."""
    if given is not None:
        return given
    return max(64, min(1024, SHUFFLE_MEMORY // (3 * recipe.input_size ** 2)))


def buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a buffer of up to `size` items (an item's content does not depend on its order).

    Yielding starts once size // 8 items are in and the buffer grows to `size` by taking two
    items in per item out, as webdataset's shuffle does: an epoch starts without waiting for a full buffer.
    """
    initial = max(1, size // 8)
    buf: list = []
    stream = iter(items)
    for item in stream:
        buf.append(item)
        if len(buf) < size:
            extra = next(stream, _END)
            if extra is not _END:
                buf.append(extra)
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: np.random.Generator):
    j = int(rng.integers(len(buf)))
    buf[j], buf[-1] = buf[-1], buf[j]
    return buf.pop()


class _Views(IterableDataset):
    """What both training-view datasets share: the split's shards, and unit items made from a shard's records."""

    def __init__(self, manifest: Manifest, recipe: Recipe, run_seed: int, split: str,
                 decode_memory: int = DECODE_MEMORY):
        super().__init__()
        self.manifest, self.recipe, self.run_seed, self.split = manifest, recipe, run_seed, split
        self.shards = manifest.shards(split)
        self.counts = manifest.shard_counts(split)
        self.decode_memory = decode_memory  # bytes of decoded images a worker holds at most
        self._replayer = None
        self._sizes: dict[int, np.ndarray] = {}  # decoded image sizes by shard and position, as read (-1: not yet)

    @property
    def replayer(self) -> Replayer:
        """The replayer, built in the worker process (the transform need not be pickled)."""
        if self._replayer is None:
            self._replayer = Replayer(self.recipe, self.run_seed)
        return self._replayer

    def _unit(self, records, epoch: int, shard_no: int) -> UnitPlan:
        return self.replayer.plan(len(records), epoch, self.shards[shard_no], shard_no)

    def _unit_items(self, unit: UnitPlan, records, numbers: Sequence[int], images: DecodedImages,
                    fingerprint_every: int = 1) -> Iterator[tuple[View, ...]]:
        """The unit's items `numbers`, decoding their images within the memory budget (in groups when they do not
        all fit: the items then come group pair by group pair)."""
        shown = [[unit.slots[s].position for s in unit.item_slots(n)] for n in numbers]
        sizes = self._sizes.setdefault(unit.shard_no, np.full(len(records), -1, dtype=np.int64))
        for positions, which in steps_for(records, shown, self.decode_memory, sizes):
            held = images.hold(positions)
            yield from self.replayer.items(unit, records, held, fingerprint_every=fingerprint_every,
                                           numbers=[numbers[i] for i in which])


class ReplayViews(_Views):
    """A rank's training views, epoch by epoch: items of `EpochPlan`'s equal share, decoding only the images the
    share's items show (a decoded image serves all its repeats).

    One dataset serves a whole run: `set_epoch` chooses the epoch through shared memory, so a DataLoader with
    persistent workers keeps its workers (and their imports and open files) from one epoch to the next. Views come
    from epoch `e % view_epochs` (a cache's epochs, cycled), the order of the shards from `e` itself. `annotate`,
    if given, runs in the worker once per unit (stage two attaches cached targets there).
    """

    def __init__(self, manifest: Manifest, recipe: Recipe, run_seed: int, epoch: int = 0, split: str = "train",
                 rank: int | None = None, world_size: int | None = None, view_epochs: int | None = None,
                 shuffle_buffer: int = 0, shuffle_seed: int = 0, annotate: Annotator | None = None,
                 fingerprint_every: int = 1, batch_size: int | None = None, decode_memory: int = DECODE_MEMORY):
        super().__init__(manifest, recipe, run_seed, split, decode_memory)
        info = pytorch_worker_info()
        self.rank = info[0] if rank is None else rank
        self.world_size = info[1] if world_size is None else world_size
        self.view_epochs, self.batch_size = view_epochs, batch_size
        if batch_size is not None and batch_size % (2 if recipe.mixes else 1):
            raise ReplayKDError(f"recipe {recipe.name} mixes views in pairs, so the batch size must be even, got "
                                f"{batch_size}")
        self.shuffle_buffer, self.shuffle_seed, self.annotate = shuffle_buffer, shuffle_seed, annotate
        self.fingerprint_every = fingerprint_every
        self._epoch = multiprocessing.RawValue("q", epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration (in this process and in persistent workers) yield `epoch`."""
        self._epoch.value = epoch

    @property
    def epoch(self) -> int:
        """The training epoch the next iteration yields."""
        return self._epoch.value

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The plan of a training epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        view_epoch = epoch % self.view_epochs if self.view_epochs else epoch
        return EpochPlan(self.counts, self.recipe.repeats, self.recipe.mixes, self.run_seed, view_epoch, epoch)

    def __len__(self) -> int:
        """Views this rank makes in the current epoch (the same on every rank)."""
        return self.views()

    def views(self, epoch: int | None = None) -> int:
        """Views this rank makes in an epoch: its whole batches' (all its items' without a batch size)."""
        plan = self.plan(epoch)
        if self.batch_size is not None:
            return plan.batches(self.world_size, self.batch_size) * self.batch_size
        return plan.rank_items(self.world_size) * plan.group

    def batches(self, epoch: int | None = None) -> int:
        """Full batches this rank takes in an epoch (the same on every rank, whatever its worker count)."""
        return self.plan(epoch).batches(self.world_size, self.batch_size)

    def _items(self, segments: list[Segment]) -> Iterator[tuple[View, ...]]:
        # from an object store, a segment's shard (and cache unit) are fetched while the one before is replayed: its
        # latency is hidden, and a shard's bytes are held twice as long
        prefetch = getattr(self.annotate, "prefetch", None)
        depth = int(is_url(self.manifest.shard_root) or getattr(self.annotate, "remote", False))

        def fetch(seg: Segment):
            if prefetch is not None and depth:
                prefetch(seg.epoch, seg.shard_no)
            return read_shard(self.manifest, self.split, self.shards[seg.shard_no])

        for seg, records in zip(segments, read_ahead(segments, fetch, depth)):
            unit = self._unit(records, seg.epoch, seg.shard_no)
            needed = set(unit.positions(seg.start, seg.stop))  # with r repeats, about 1/r of the shard's images
            records = [r if r.position in needed else dataclasses.replace(r, data=b"") for r in records]
            attach = self.annotate(unit) if self.annotate is not None else None
            images = DecodedImages(records, f"{self.shards[seg.shard_no]}:")
            for item in self._unit_items(unit, records, range(seg.start, seg.stop), images, self.fingerprint_every):
                if attach is not None:
                    for view in item:
                        attach(view)
                yield item
            del records, images  # the shard's bytes and images go before the next shard is read

    def __iter__(self) -> Iterator[View]:
        _, _, worker, workers = pytorch_worker_info()
        plan = self.plan()
        items = self._items(plan.segments(self.rank, self.world_size, worker, workers, self.batch_size))
        if self.shuffle_buffer > 1:  # whole items: a pair's two views stay together (the buffer's size is in views)
            rng = np.random.default_rng([self.shuffle_seed, self.epoch, self.rank, worker])
            items = buffer_shuffle(items, max(1, self.shuffle_buffer // plan.group), rng)
        return (view for item in items for view in item)


class CacheViews(_Views):
    """Stage one's views: whole units of the data shards a `Dealer` hands out through `jobs` (a queue of ShardWork,
    None ending a worker's stream), each shard decoded once for all its missing epochs. `len()` is `views`, what
    this process expects to make (its share)."""

    def __init__(self, manifest: Manifest, recipe: Recipe, run_seed: int, jobs, views: int = 0,
                 split: str = "train", decode_memory: int = DECODE_MEMORY):
        super().__init__(manifest, recipe, run_seed, split, decode_memory)
        self.jobs, self.expected = jobs, views

    def __len__(self) -> int:
        return self.expected

    def __iter__(self) -> Iterator[View]:
        # from an object store, the next job's shard is fetched while this one's views are made
        fetched = read_ahead(iter(self.jobs.get, None),
                             lambda w: (w, read_shard(self.manifest, self.split, self.shards[w.shard_no])),
                             int(is_url(self.manifest.shard_root)))
        for w, records in fetched:
            # the whole shard fits the budget: each image decoded once, as first needed, for all the shard's epochs
            whole = sum(decoded_size(r.data) for r in records) <= self.decode_memory
            images = DecodedImages(records, f"{self.shards[w.shard_no]}:", keep_all=whole)
            for epoch in w.epochs:
                unit = self._unit(records, epoch, w.shard_no)
                for item in self._unit_items(unit, records, range(unit.items), images):
                    yield from item
            del records, images


_STATE_BYTES = torch.Generator().get_state().numel()


def _erase_states(boxes: Sequence[Erase]) -> torch.Tensor:
    """(boxes, state bytes) uint8: each box's generator state, zeros for a box of zeros."""
    out = torch.zeros((len(boxes), _STATE_BYTES), dtype=torch.uint8)
    for i, e in enumerate(boxes):
        if e.fill != FILL_ZERO:
            out[i] = e.state
    return out


def _empty_like_rows(first: torch.Tensor, rows: int) -> torch.Tensor:
    """Room for `rows` tensors shaped like `first`: in shared memory in a loader worker, where batches go to the
    main process from (as torch's own collate does: no copy on the way out)."""
    shape = (rows, *first.shape)
    if get_worker_info() is None:
        return torch.empty(shape, dtype=first.dtype)
    storage = first._typed_storage()._new_shared(first.numel() * rows, device=first.device)
    return first.new(storage).resize_(shape)


class _Rows:
    """A batch being filled view by view: each image's pixels are copied into the batch once, as the first view that
    shows it (as its own image or its partner's) comes, and dropped from the view when `drop_pixels`, so a worker
    never holds a batch's views and the batch at once."""

    def __init__(self, rows: int, first: View, drop_pixels: bool):
        self.pairs = first.partner_image is not None
        self.pixels = _empty_like_rows(first.image, rows * (2 if self.pairs else 1))
        self.filled = 0
        self.image_rows: list[int] = []
        self.partner_rows: list[int] = []
        self.erased: list[tuple[int, Erase]] = []  # (pixel row, box): each image's erasing, once
        # images copied in whose second showing is still to come, by object: a pair's two views share their two
        # pixel tensors (each view's own is its partner's partner image); held here, so an id is never reused
        self.waiting: dict[int, tuple[int, torch.Tensor]] = {}
        self.views: list[View] = []
        self.drop_pixels = drop_pixels

    def _row(self, pixels: torch.Tensor, erase: tuple[Erase, ...]) -> int:
        seen = self.waiting.pop(id(pixels), None)
        if seen is not None:
            return seen[0]
        row, self.filled = self.filled, self.filled + 1
        self.pixels[row] = pixels
        self.erased += [(row, e) for e in erase]
        if self.pairs:
            self.waiting[id(pixels)] = (row, pixels)
        return row

    def add(self, view: View) -> None:
        if (view.partner_image is None) == self.pairs:
            raise ValueError("a batch mixes views with and without partners")
        self.image_rows.append(self._row(view.image, view.erase))
        if self.pairs:
            self.partner_rows.append(self._row(view.partner_image, view.partner_erase))
        if self.drop_pixels:
            view.image = view.partner_image = None
        self.views.append(view)


class ViewCollate:
    """Views into a `ViewBatch` with the mixed, label-smoothed targets: a list at once (`__call__`), or a stream of
    views into batches as they come (`batches`, what the loader workers run)."""

    def __init__(self, num_classes: int, smoothing: float):
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, views: Sequence[View]) -> ViewBatch:
        rows = _Rows(len(views), views[0], drop_pixels=False)
        for view in views:
            rows.add(view)
        return self._finish(rows)

    def batches(self, views: Iterable[View], pieces: Sequence[int], partial: bool = False,
                worker: int = 0) -> Iterator[ViewBatch]:
        """Batches of `pieces[0]`, `pieces[1]`, ... views in turn (the pieces of a training batch, again and again),
        built as the views come; a last, partial one only with `partial`. Each says it came from `worker`."""
        sizes = itertools.cycle(pieces)
        size, rows = next(sizes), None
        for view in views:
            if rows is None:
                rows = _Rows(size, view, drop_pixels=True)
            rows.add(view)
            if len(rows.views) == size:
                yield self._finish(rows, worker)
                size, rows = next(sizes), None
        if rows is not None and partial:
            yield self._finish(rows, worker)

    def _finish(self, rows: _Rows, worker: int = 0) -> ViewBatch:
        views, n = rows.views, len(rows.views)

        def column(name: str, dtype=torch.int64) -> torch.Tensor:
            return torch.tensor([getattr(v, name) for v in views], dtype=dtype)

        labels, partner_labels, lams = column("label"), column("partner_label"), column("lam", torch.float64)
        off = self.smoothing / self.num_classes
        on = 1.0 - self.smoothing + off
        own = torch.full((n, self.num_classes), off).scatter_(1, labels.view(-1, 1), on)
        other = torch.full((n, self.num_classes), off).scatter_(1, partner_labels.view(-1, 1), on)
        lam = lams.to(torch.float32).unsqueeze(1)
        erased = rows.erased
        erase_boxes = torch.tensor([(row, e.top, e.left, e.height, e.width, e.fill) for row, e in erased],
                                   dtype=torch.int64).view(-1, 6)
        erase_states = _erase_states([e for _, e in erased])
        mix_boxes = torch.tensor([v.box or (-1, -1, -1, -1) for v in views], dtype=torch.int64)
        fingerprints = None if any(v.fingerprint is None for v in views) else column("fingerprint")
        teacher = None if views[0].teacher is None else TeacherTargets.stack([v.teacher for v in views])
        return ViewBatch([rows.pixels[:rows.filled]], torch.tensor(rows.image_rows, dtype=torch.int64),
                         torch.tensor(rows.partner_rows, dtype=torch.int64) if rows.pairs else None, erase_boxes,
                         erase_states, mix_boxes, lams, labels, lam * own + (1.0 - lam) * other,
                         [v.key for v in views], column("index"), column("repeat"), column("slot"), column("shard_no"),
                         column("epoch"), column("partner"), partner_labels, fingerprints, teacher, worker)


class Batched(IterableDataset):
    """A view dataset's stream in batches made in the loader worker itself (use with DataLoader(batch_size=None)):
    each view goes into its batch as it is made. `partial`: also the last, partial batch of each worker's stream.
    A worker makes each batch of `size` views in pieces of at most WORKER_BATCH views (`regroup` joins a worker's
    pieces again), so that it holds the pixels of one small piece at a time: at 224 px with partners, 64 views are
    19 MB where 256 are 77 MB. A piece holds whole items, so a mixed pair is never split."""

    def __init__(self, views: _Views, size: int, collate: ViewCollate, partial: bool = False):
        super().__init__()
        self.views, self.size, self.collate, self.partial = views, size, collate, partial

    def __iter__(self) -> Iterator[ViewBatch]:
        info = get_worker_info()
        pairs = self.views.recipe.mixes and self.size % 2 == 0  # stage one's odd batches bring partners' pixels
        pieces = worker_pieces(self.size, 2 if pairs else 1)
        return self.collate.batches(iter(self.views), pieces, self.partial, info.id if info is not None else 0)


def worker_pieces(size: int, group: int = 1) -> list[int]:
    """The pieces a loader worker makes a batch of `size` views in: the fewest of at most WORKER_BATCH views, their
    sizes within one item of each other, each a whole number of items of `group` views (2: mixed pairs)."""
    items, parts = size // group, -(-size // WORKER_BATCH)
    return [group * (stop - start) for start, stop in (split_range(items, parts, i) for i in range(parts))]


def regroup(batches: Iterable[ViewBatch], size: int) -> Iterator[ViewBatch]:
    """Join each loader worker's pieces into batches of `size` views (their pixels stay in the pieces' chunks), each
    batch as its worker's pieces complete it; at the end, what each worker has left, as a smaller batch."""
    pending: dict[int, list[ViewBatch]] = {}
    for piece in batches:
        got = pending.setdefault(piece.worker, [])
        got.append(piece)
        if sum(len(p) for p in got) >= size:
            yield ViewBatch.concat(pending.pop(piece.worker))
    for got in pending.values():
        yield ViewBatch.concat(got)


class EvalViews(IterableDataset):
    """Evaluation views of a split through an evaluation transform (timm's: resize, centre crop, normalise); ranks,
    then workers, take every n-th shard."""

    def __init__(self, manifest: Manifest, transform: Callable, split: str = "val", rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        self.manifest, self.split, self.transform = manifest, split, transform
        info = pytorch_worker_info()
        self.rank = info[0] if rank is None else rank
        self.world_size = info[1] if world_size is None else world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(image, label) pairs; the default collate stacks them into (images, labels)."""
        _, _, worker, num_workers = pytorch_worker_info()
        for shard in self.manifest.shards(self.split)[self.rank::self.world_size][worker::num_workers]:
            for r in read_shard(self.manifest, self.split, shard):
                yield self.transform(decode_image(r.data, f"{shard}:{r.key}")), r.label


def setup_worker(_: int) -> None:
    """DataLoader worker set-up: leave Ctrl-C to the main process, which stops the workers and says where it
    stopped (a worker's own KeyboardInterrupt would print a traceback per worker); and keep the objects inherited
    from the main process out of the worker's garbage collections (each would walk them all: measured, a worker's
    first object-store read took 0.70 s of CPU instead of 0.23 s after the main process had used the store)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.freeze()


def stop_workers(*loaders) -> None:
    """Shut down loaders' worker processes now, through their own exit path (which removes the temporary folders
    multiprocessing made for them), rather than whenever the interpreter gets to collecting the loaders."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # a DataLoader keeps its persistent workers' iterator here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


# The longest path of a Unix socket on Linux (sun_path's 108 bytes, its closing NUL included).
UNIX_SOCKET_PATH = 107
# What multiprocessing adds to the temporary folder for the socket a loader worker hands its batches' shared memory
# over: "/pymp-XXXXXXXX/listener-XXXXXXXX".
SOCKET_SUFFIX = 32


def check_worker_tempdir() -> None:
    """Refuse a temporary folder whose path leaves no room for the loader workers' sockets: the socket cannot be
    made, the batch whose memory it should hand over is dropped (multiprocessing prints the error and goes on) and
    the run waits for it for ever."""
    folder = tempfile.gettempdir()
    if len(os.fsencode(folder)) + SOCKET_SUFFIX > UNIX_SOCKET_PATH:
        raise ReplayKDError(f"the temporary folder {folder} ({len(os.fsencode(folder))} bytes) is too long a path for "
                            f"loader workers: they make Unix sockets under it, whose paths may not pass "
                            f"{UNIX_SOCKET_PATH} bytes ({len(os.fsencode(folder)) + SOCKET_SUFFIX} here). Set TMPDIR "
                            "to a shorter folder (e.g. TMPDIR=/tmp), or use --workers 0")


def loader_settings(workers: int, prefetch: int, device: torch.device, seed: int = 0) -> dict:
    """DataLoader settings for long runs: workers kept across epochs, pinned memory on GPU, `prefetch` batches queued
    per worker, and a generator of its own for the workers' seeds, so that starting a loader never draws from the
    global generator (whose state a resumed run restores: drawing from it would change what follows)."""
    if workers > 0:
        check_worker_tempdir()
    return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": device.type == "cuda",
            "prefetch_factor": prefetch if workers > 0 else None, "worker_init_fn": setup_worker if workers else None,
            "generator": torch.Generator().manual_seed(seed)}
