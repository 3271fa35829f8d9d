"""Deterministic views: each training view is a pure function of (run seed, epoch, sample key, repeat, recipe).

timm's augmentations draw from Python's `random`, numpy's global generator and torch's CPU generator. Every view is
made inside `seeded_globals`, which seeds all three from the view's own seed and restores their previous states
afterwards, so nothing outside sees a changed generator and no view depends on what ran before it (worker, rank,
batch or order). Which views a unit holds and how they pair is the epoch plan's (`pipeline/plan.py`).

A view leaves the worker as uint8 pixels after timm's PIL stages (crop, flip, RandAugment), with what the float
stages need: the random-erasing boxes and values (drawn here by timm's own RandomErasing, in its order), the pair's
Mixup/CutMix parameters and its partner's pixels and erasing, so that every view finishes on its own and a batch
can hold views of many pairs. `pipeline/finish.py` runs the float stages where the batch is consumed.
"""
from __future__ import annotations

import io
import random
import struct
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.mixup import cutmix_bbox_and_lam

from pipeline.errors import ReplayKDError
from pipeline.finish import normalise_table
from pipeline.plan import TAG_PAIR, TAG_VIEW, Slot, UnitPlan, derive_seed, plan_unit
from pipeline.reader import crc32c, crc32c_extend
from pipeline.recipe import Recipe
from pipeline.records import Erase, MixParams, View

if TYPE_CHECKING:
    from pipeline.reader import Record

# Items made inside one save/restore of the global generators (saving numpy's state costs ~30 us).
ITEMS_PER_CONTEXT = 8


def view_seed(run_seed: int, epoch: int, key: str, repeat: int = 0) -> int:
    """The seed of sample `key`'s own augmentation in `epoch`, for its `repeat`-th view."""
    return derive_seed(run_seed, epoch, TAG_VIEW, key, str(repeat))


@contextmanager
def seeded_globals():
    """Save Python's, numpy's and torch's CPU generator states; restore them on exit.

    Inside, call the yielded `reseed(seed)` before each random draw that must be reproducible.
    """
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()

    def reseed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are left alone

    try:
        yield reseed
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


def image_library() -> str:
    """Which Pillow build decodes and resamples: 'pillow-simd' or 'pillow'. Builds may round resampling
    differently, so a cache records which one made its views."""
    from importlib import metadata

    try:
        metadata.version("pillow-simd")
        return "pillow-simd"
    except metadata.PackageNotFoundError:
        return "pillow"


def decode_image(data: bytes, origin: str) -> Image.Image:
    """Decode encoded image bytes to RGB; a corrupt image is an error naming `origin`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as exn:
        raise ReplayKDError(f"cannot decode image {origin}: {exn}") from exn


def decode_positions(records: Sequence["Record"], positions: Iterable[int], origin: str = "") -> dict[int, Image.Image]:
    """The decoded images of the records at `positions`, by position; an error names `origin` and the key."""
    return {p: decode_image(records[p].data, f"{origin}{records[p].key}") for p in positions}


def draw_mix(recipe: Recipe, height: int, width: int) -> MixParams:
    """Draw a pair's Mixup/CutMix parameters from the (already seeded) numpy global, as timm's Mixup does."""
    if not recipe.mixes or np.random.rand() >= recipe.mix_prob:
        return MixParams()
    if recipe.mixup > 0 and recipe.cutmix > 0:
        use_cutmix = np.random.rand() < recipe.switch_prob
    else:
        use_cutmix = recipe.cutmix > 0
    alpha = recipe.cutmix if use_cutmix else recipe.mixup
    lam = float(np.random.beta(alpha, alpha))
    if not use_cutmix:
        return MixParams(lam)
    box, lam = cutmix_bbox_and_lam((height, width), lam, correct_lam=True)
    return MixParams(float(lam), tuple(int(v) for v in box))


class _EraseRecorder:
    """Stands in for the view tensor in timm's `RandomErasing._erase`: records each box and its values instead of
    writing them, so every draw (Python's random for the box, torch's generator for the values) is timm's own."""

    def __init__(self, channels: int):
        self.channels, self.boxes = channels, []

    def __setitem__(self, key, values: torch.Tensor) -> None:
        _, rows, cols = key
        h, w = rows.stop - rows.start, cols.stop - cols.start
        self.boxes.append(Erase(rows.start, cols.start, h, w, values.expand(self.channels, h, w).contiguous()))


def fingerprint(image: torch.Tensor, erase: Sequence[Erase], mix: MixParams, partner: int, floats: int = 0) -> int:
    """CRC-32C of everything that makes a view: its uint8 pixels, erasing boxes and values, mix parameters and
    partner, and `floats`, the CRC of the table that turns pixels into floats (so a change in normalisation shows
    too). Equal fingerprints mean a bit-identical replay (no float arithmetic is involved)."""
    crc = crc32c_extend(crc32c(image.numpy()), struct.pack("<I", floats))
    crc = crc32c_extend(crc, struct.pack("<dq4q", mix.lam, partner, *(mix.box or (-1, -1, -1, -1))))
    for e in erase:
        crc = crc32c_extend(crc, struct.pack("<4q", e.top, e.left, e.height, e.width))
        crc = crc32c_extend(crc, e.values.numpy())
    return crc


class Replayer:
    """Makes the views of a recipe for a run seed: a unit's items (pairs to mix, or single views), or one view."""

    def __init__(self, recipe: Recipe, run_seed: int):
        self.recipe = recipe
        self.run_seed = run_seed
        primary, secondary, final = recipe.train_transform(separate=True)
        self.pil_steps = primary.transforms + secondary.transforms
        erasing = [t for t in final.transforms if type(t).__name__ == "RandomErasing"]
        self.erasing = erasing[0] if erasing else None
        self.floats = crc32c(normalise_table(recipe).numpy())

    def plan(self, n: int, epoch: int, shard: str, shard_no: int = 0) -> UnitPlan:
        """The views of the unit (epoch, shard of `n` samples) under this recipe."""
        return plan_unit(n, self.recipe.repeats, self.recipe.mixes, self.run_seed, epoch, shard, shard_no)

    def _view(self, reseed, image: Image.Image, seed: int) -> tuple[torch.Tensor, tuple[Erase, ...]]:
        reseed(seed)
        for step in self.pil_steps:
            image = step(image)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        if self.erasing is None:
            return pixels, ()
        # the float stages (to tensor, normalise) draw nothing, so the generators are where timm's erasing finds them
        recorder = _EraseRecorder(pixels.shape[2])
        self.erasing._erase(recorder, pixels.shape[2], pixels.shape[0], pixels.shape[1], torch.float32)
        return pixels, tuple(recorder.boxes)

    def view(self, image: Image.Image, key: str, epoch: int, repeat: int = 0) -> tuple[torch.Tensor, tuple[Erase, ...], int]:
        """The unmixed view of one sample in `epoch` (its `repeat`-th): uint8 pixels, erasing boxes, seed."""
        seed = view_seed(self.run_seed, epoch, key, repeat)
        with seeded_globals() as reseed:
            return (*self._view(reseed, image, seed), seed)

    def _mix_params(self, reseed, members: Sequence[tuple[str, int]], epoch: int, height: int, width: int) -> MixParams:
        reseed(derive_seed(self.run_seed, epoch, TAG_PAIR, *(f"{k}\0{r}" for k, r in members)))
        return draw_mix(self.recipe, height, width)

    def mix_params(self, members: Sequence[tuple[str, int]], epoch: int, height: int, width: int) -> MixParams:
        """The Mixup/CutMix parameters of the pair of (key, repeat) views `members` in `epoch`."""
        with seeded_globals() as reseed:
            return self._mix_params(reseed, members, epoch, height, width)

    def _item(self, reseed, slots: Sequence[Slot], records: Sequence["Record"], images: Mapping[int, Image.Image],
              epoch: int):
        members = [(records[s.position].key, s.repeat) for s in slots]
        seeds = [view_seed(self.run_seed, epoch, k, r) for k, r in members]
        made = [self._view(reseed, images[s.position], seed) for s, seed in zip(slots, seeds)]
        if len(made) == 1:
            return made, seeds, MixParams()
        return made, seeds, self._mix_params(reseed, members, epoch, *made[0][0].shape[:2])

    def items(self, plan: UnitPlan, records: Sequence["Record"], images: Mapping[int, Image.Image], start: int = 0,
              stop: int | None = None, fingerprint_every: int = 1,
              numbers: Sequence[int] | None = None) -> Iterator[tuple[View, ...]]:
        """Items [start, stop) of a unit, or the items `numbers` in that order: each a tuple of its views (a pair
        to mix, or one view).

        `records` are the shard's manifest records by position, `images` the decoded images of the positions the
        items show. Fingerprints are computed for slots divisible by `fingerprint_every` (0: none).
        """
        numbers = range(start, plan.items if stop is None else stop) if numbers is None else numbers
        for first in range(0, len(numbers), ITEMS_PER_CONTEXT):
            made = []
            with seeded_globals() as reseed:  # never held across a yield: the caller may use the generators
                for item in numbers[first:first + ITEMS_PER_CONTEXT]:
                    item_slots = plan.item_slots(item)
                    slots = [plan.slots[n] for n in item_slots]
                    made.append((item_slots, slots, *self._item(reseed, slots, records, images, plan.epoch)))
            for item_slots, slots, views, seeds, mix in made:
                out = []
                for i, (number, slot, (pixels, erase), seed) in enumerate(zip(item_slots, slots, views, seeds)):
                    own, partner = records[slot.position], records[slots[-1 - i].position]
                    partner_image, partner_erase = views[-1 - i] if len(views) == 2 else (None, ())
                    checked = fingerprint_every and number % fingerprint_every == 0
                    out.append(View(
                        image=pixels, key=own.key, index=own.index, position=own.position, repeat=slot.repeat,
                        slot=number, shard_no=plan.shard_no, epoch=plan.epoch, seed=seed, label=own.label,
                        partner=partner.index, partner_label=partner.label, lam=mix.lam, box=mix.box, erase=erase,
                        partner_image=partner_image, partner_erase=partner_erase,
                        fingerprint=fingerprint(pixels, erase, mix, partner.index, self.floats) if checked else None))
                yield tuple(out)

    def view_at(self, plan: UnitPlan, records: Sequence["Record"], slot: int) -> View:
        """The view in `slot` of a unit (with its partner's pixels), decoding only its pair's images."""
        item = slot // plan.group
        images = decode_positions(records, plan.positions(item, item + 1))
        return next(self.items(plan, records, images, item, item + 1))[slot % plan.group]
