"""Deterministic views: each training view is a pure function of (run seed, epoch, sample key, repeat, recipe).

timm's augmentations draw from Python's `random`, numpy's global generator and torch's CPU generator.
Every view is made inside `seeded_globals`, which seeds all three from the view's own seed and restores
their previous states afterwards, so nothing outside sees a changed generator and no view depends on
what ran before it (worker, rank, batch or order). Which views a unit holds and how they pair is the
epoch plan's (`pipeline/plan.py`).
"""
from __future__ import annotations

import io
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.mixup import cutmix_bbox_and_lam

from pipeline.errors import ReplayKDError
from pipeline.plan import TAG_PAIR, TAG_VIEW, Slot, UnitPlan, derive_seed, plan_unit
from pipeline.reader import crc32c
from pipeline.recipe import Recipe

if TYPE_CHECKING:
    from pipeline.reader import Record
    from pipeline.targets import TeacherTargets

# Items made inside one save/restore of the global generators (saving numpy's state costs ~30 us).
ITEMS_PER_CONTEXT = 32


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


def fingerprint(view: torch.Tensor) -> int:
    """CRC-32C of the view tensor's bytes: equal fingerprints mean a bit-identical replay."""
    return crc32c(view.contiguous().numpy())


def decode_image(data: bytes, origin: str) -> Image.Image:
    """Decode encoded image bytes to RGB; a corrupt image is an error naming `origin`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as exn:
        raise ReplayKDError(f"cannot decode image {origin}: {exn}") from exn


@dataclass(frozen=True)
class MixParams:
    """How a pair is mixed: own-image weight `lam` and, for CutMix, the pasted box (y0, y1, x0, x1)."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


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


def mix_pair(a: torch.Tensor, b: torch.Tensor, p: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The two mixed views of a pair: each keeps weight `lam` of itself and takes 1 - lam of the other."""
    if p.box is None and p.lam == 1.0:
        return a, b
    # numpy, not torch: each small torch op costs ~5-10 us, more than the arithmetic on a 16 px view
    an, bn = a.numpy(), b.numpy()
    if p.box is not None:
        ma, mb = an.copy(), bn.copy()
        y0, y1, x0, x1 = p.box
        ma[:, y0:y1, x0:x1] = bn[:, y0:y1, x0:x1]
        mb[:, y0:y1, x0:x1] = an[:, y0:y1, x0:x1]
    else:
        ma, mb = an * p.lam + bn * (1.0 - p.lam), bn * p.lam + an * (1.0 - p.lam)  # float32 (NEP 50)
    return torch.from_numpy(ma), torch.from_numpy(mb)


@dataclass
class View:
    """One replayed training view: the image, the sample it shows and everything that decides its targets.

    `slot` is its place among its unit's views (the cache's row); `partner` is the global index of the sample it is
    mixed with (its own index: unmixed) and `lam` the weight of its own image; `fingerprint` (CRC-32C of the view)
    is None where the loader did not compute it. `teacher` holds the view's cached teacher targets once the loader
    has attached them.
    """

    image: torch.Tensor
    key: str
    index: int
    position: int
    repeat: int
    slot: int
    shard_no: int
    epoch: int
    seed: int
    label: int
    partner: int
    partner_label: int
    lam: float
    fingerprint: int | None = None
    teacher: "TeacherTargets | None" = None


class Replayer:
    """Makes the views of a recipe for a run seed: a unit's items (mixed pairs, or single views), or one view."""

    def __init__(self, recipe: Recipe, run_seed: int):
        self.recipe = recipe
        self.run_seed = run_seed
        self.transform = recipe.train_transform()

    def plan(self, n: int, epoch: int, shard: str, shard_no: int = 0) -> UnitPlan:
        """The views of the unit (epoch, shard of `n` samples) under this recipe."""
        return plan_unit(n, self.recipe.repeats, self.recipe.mixes, self.run_seed, epoch, shard, shard_no)

    def _view(self, reseed, image: Image.Image, seed: int) -> torch.Tensor:
        reseed(seed)
        return self.transform(image)

    def view(self, image: Image.Image, key: str, epoch: int, repeat: int = 0) -> tuple[torch.Tensor, int]:
        """The unmixed augmented view of one sample in `epoch` (its `repeat`-th), and its seed."""
        seed = view_seed(self.run_seed, epoch, key, repeat)
        with seeded_globals() as reseed:
            return self._view(reseed, image, seed), seed

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
        views = [self._view(reseed, images[s.position], seed) for s, seed in zip(slots, seeds)]
        if len(views) == 1:
            return views, seeds, MixParams()
        params = self._mix_params(reseed, members, epoch, *views[0].shape[-2:])
        return list(mix_pair(views[0], views[1], params)), seeds, params

    def items(self, plan: UnitPlan, records: Sequence["Record"], images: Mapping[int, Image.Image], start: int = 0,
              stop: int | None = None, fingerprint_every: int = 1) -> Iterator[tuple[View, ...]]:
        """Items [start, stop) of a unit: each a tuple of its views (a mixed pair, or one view).

        `records` are the shard's manifest records by position, `images` the decoded images of the positions the
        items show. Fingerprints are computed for slots divisible by `fingerprint_every` (0: none).
        """
        stop = plan.items if stop is None else stop
        for first in range(start, stop, ITEMS_PER_CONTEXT):
            made = []
            with seeded_globals() as reseed:  # never held across a yield: the caller may use the generators
                for item in range(first, min(stop, first + ITEMS_PER_CONTEXT)):
                    slots = [plan.slots[s] for s in plan.item_slots(item)]
                    made.append((item, slots, *self._item(reseed, slots, records, images, plan.epoch)))
            for item, slots, tensors, seeds, params in made:
                out = []
                for i, (slot, tensor, seed) in enumerate(zip(slots, tensors, seeds)):
                    own, partner = records[slot.position], records[slots[-1 - i].position]
                    number = item * plan.group + i
                    checked = fingerprint_every and number % fingerprint_every == 0
                    out.append(View(tensor, own.key, own.index, own.position, slot.repeat, number, plan.shard_no,
                                    plan.epoch, seed, own.label, partner.index, partner.label, params.lam,
                                    fingerprint(tensor) if checked else None))
                yield tuple(out)

    def view_at(self, plan: UnitPlan, records: Sequence["Record"], slot: int) -> View:
        """The view in `slot` of a unit, decoding only its item's images."""
        item = slot // plan.group
        images = {p: decode_image(records[p].data, records[p].key) for p in plan.positions(item, item + 1)}
        return next(self.items(plan, records, images, item, item + 1))[slot % plan.group]
