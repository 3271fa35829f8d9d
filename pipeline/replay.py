"""Deterministic views: each training view is a pure function of (run seed, epoch, sample key, repeat, recipe).

Every random draw of a view (timm's crop, flip, RandAugment, erasing; its Mixup/CutMix) comes from generators seeded
with the view's own seed (its pairing group's, pair's or own for the mix, as the recipe's mix_mode says) and owned by
this thread (`pipeline/augment.py`), never from the process-wide ones: no other thread, worker, rank, batch or order
can change a view, and nothing outside sees a changed generator. Which views a unit holds and how they pair is the epoch plan's (`pipeline/plan.py`).

A view leaves the worker as uint8 pixels after timm's PIL stages (crop, flip, RandAugment), with what the float
stages need: the random-erasing boxes and values (drawn as timm's RandomErasing draws them, in its order), its
Mixup/CutMix parameters and its partner's pixels and erasing, so that every view finishes in any batch (a batch
holding both views of a pair keeps each image once: `pipeline/loader.py`). `pipeline/finish.py` runs the float
stages where the batch is consumed.
"""
from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from replaykd.augment import Augmentation, draw_mix, draws
from replaykd.errors import BadImage
from replaykd.finish import normalise_table
from replaykd.plan import TAG_ELEM, TAG_GROUP, TAG_PAIR, TAG_VIEW, UnitPlan, derive_seed, plan_unit
from replaykd.reader import crc32c, crc32c_extend
from replaykd.recipe import Recipe
from replaykd.records import Erase, MixParams, View

if TYPE_CHECKING:
    from replaykd.reader import Record

def view_seed(run_seed: int, epoch: int, key: str, repeat: int = 0) -> int:
    """The seed of sample `key`'s own augmentation in `epoch`, for its `repeat`-th view."""
    return derive_seed(run_seed, epoch, TAG_VIEW, key, str(repeat))


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
            if im.mode != "RGB":
                return im.convert("RGB")
            im.load()  # the pixels, in memory: an RGB image is used as decoded (convert would copy it)
            return im
    except Exception as exn:
        raise BadImage.of(origin, exn) from exn


def decode_positions(records: Sequence["Record"], positions: Iterable[int], origin: str = "") -> dict[int, Image.Image]:
    """The decoded images of the records at `positions`, by position; an error names `origin` and the key."""
    return {p: decode_image(records[p].data, f"{origin}{records[p].key}") for p in positions}


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
        self.augmentation = Augmentation(recipe)
        self.floats = crc32c(normalise_table(recipe).numpy())

    def plan(self, n: int, epoch: int, shard: str, shard_no: int = 0) -> UnitPlan:
        """The views of the unit (epoch, shard of `n` samples) under this recipe."""
        return plan_unit(n, self.recipe.repeats, self.recipe.mixes, self.run_seed, epoch, shard, shard_no)

    def _view(self, image: Image.Image, seed: int) -> tuple[torch.Tensor, tuple[Erase, ...]]:
        d = draws(seed)  # used up before the next view reseeds it
        pixels = self.augmentation.pixels(image, d)
        return pixels, self.augmentation.erase(pixels, d)

    def view(self, image: Image.Image, key: str, epoch: int, repeat: int = 0) -> tuple[torch.Tensor, tuple[Erase, ...], int]:
        """The unmixed view of one sample in `epoch` (its `repeat`-th): uint8 pixels, erasing boxes, seed."""
        seed = view_seed(self.run_seed, epoch, key, repeat)
        return (*self._view(image, seed), seed)

    def mix_params(self, plan: UnitPlan, item: int, members: Sequence[tuple[str, int]], height: int,
                   width: int) -> tuple[MixParams, MixParams]:
        """The Mixup/CutMix parameters of each view of the pair `item` of a unit, its (key, repeat) views `members`:
        one draw for its whole pairing group, one for the pair, or one for each view, as the recipe's mix_mode
        says."""
        mode, epoch = self.recipe.mix_mode, plan.epoch
        if mode == "group":
            seeds = [derive_seed(self.run_seed, epoch, TAG_GROUP, plan.shard, str(plan.pairing_group(item)))]
        elif mode == "pair":
            seeds = [derive_seed(self.run_seed, epoch, TAG_PAIR, *(f"{k}\0{r}" for k, r in members))]
        else:
            seeds = [derive_seed(self.run_seed, epoch, TAG_ELEM, f"{k}\0{r}") for k, r in members]
        mixes = [draw_mix(self.recipe, height, width, draws(seed).np) for seed in seeds]
        return (mixes[0], mixes[-1])

    def _item(self, plan: UnitPlan, item: int, records: Sequence["Record"], images: Mapping[int, Image.Image]):
        slots = [plan.slots[n] for n in plan.item_slots(item)]
        members = [(records[s.position].key, s.repeat) for s in slots]
        seeds = [view_seed(self.run_seed, plan.epoch, k, r) for k, r in members]
        made = [self._view(images[s.position], seed) for s, seed in zip(slots, seeds)]
        if len(made) == 1:
            return slots, made, seeds, (MixParams(),)
        return slots, made, seeds, self.mix_params(plan, item, members, *made[0][0].shape[:2])

    def items(self, plan: UnitPlan, records: Sequence["Record"], images: Mapping[int, Image.Image], start: int = 0,
              stop: int | None = None, fingerprint_every: int = 1,
              numbers: Sequence[int] | None = None) -> Iterator[tuple[View, ...]]:
        """Items [start, stop) of a unit, or the items `numbers` in that order: each a tuple of its views (a pair
        to mix, or one view).

        `records` are the shard's manifest records by position, `images` the decoded images of the positions the
        items show. Fingerprints are computed for slots divisible by `fingerprint_every` (0: none).
        """
        numbers = range(start, plan.items if stop is None else stop) if numbers is None else numbers
        for item in numbers:
            slots, views, seeds, mixes = self._item(plan, item, records, images)
            out = []
            for i, (number, slot, (pixels, erase), seed, mix) in enumerate(zip(plan.item_slots(item), slots, views,
                                                                               seeds, mixes)):
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
