"""Deterministic views: each training view is a pure function of (run seed, epoch, sample key, recipe).

timm's augmentations draw from Python's `random`, numpy's global generator and torch's CPU generator.
Every view is made inside `seeded_globals`, which seeds all three from the view's own seed and restores
their previous states afterwards, so nothing outside sees a changed generator and no view depends on
what ran before it (worker, rank, batch or order).
"""
from __future__ import annotations

import hashlib
import io
import random
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.mixup import cutmix_bbox_and_lam

from pipeline.errors import ReplayKDError
from pipeline.reader import crc32c
from pipeline.recipe import Recipe

if TYPE_CHECKING:
    from pipeline.targets import TeacherTargets

# Domain tags keep the seed streams of views, pairs and shard permutations apart.
TAG_VIEW, TAG_PAIR, TAG_PERM = 1, 2, 3


# Views made inside one save/restore of the global generators (saving numpy's state costs ~30 us).
PAIRS_PER_CONTEXT = 32


def derive_seed(run_seed: int, epoch: int, tag: int, *names: str) -> int:
    """A 32-bit seed: BLAKE2b of (run seed, epoch, tag, names), a counter-based derivation (no state)."""
    if run_seed < 0 or epoch < 0:
        raise ReplayKDError(f"seed and epoch must be >= 0, got seed {run_seed}, epoch {epoch}")
    msg = struct.pack("<QQI", run_seed, epoch, tag) + b"\0".join(n.encode() for n in names)
    return int.from_bytes(hashlib.blake2b(msg, digest_size=4).digest(), "little")


def view_seed(run_seed: int, epoch: int, key: str) -> int:
    """The seed of sample `key`'s own augmentation in `epoch`."""
    return derive_seed(run_seed, epoch, TAG_VIEW, key)


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


def pair_positions(n: int, run_seed: int, epoch: int, shard: str, mixes: bool = True) -> list[tuple[int, int]]:
    """Mix partners inside one shard: (perm[2i], perm[2i+1]) of a per-(epoch, shard) permutation.

    An odd sample left over (or every sample, when the recipe does not mix) is its own partner: unmixed.
    """
    if not mixes:
        return [(p, p) for p in range(n)]
    perm = np.random.default_rng(derive_seed(run_seed, epoch, TAG_PERM, shard)).permutation(n).tolist()
    pairs = [(perm[i], perm[i + 1]) for i in range(0, n - 1, 2)]
    if n % 2:
        pairs.append((perm[-1], perm[-1]))
    return pairs


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

    `partner` is the global index of the sample it is mixed with (its own index: unmixed) and `lam` the weight of
    its own image; `fingerprint` (CRC-32C of the view) is None where the loader did not compute it. `teacher`
    holds the view's cached teacher targets once the loader has attached them.
    """

    image: torch.Tensor
    key: str
    index: int
    position: int
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
    """Makes the views of a recipe for a run seed: single views, and the mixed views of a whole shard."""

    def __init__(self, recipe: Recipe, run_seed: int):
        self.recipe = recipe
        self.run_seed = run_seed
        self.transform = recipe.train_transform()

    def _view(self, reseed, image: Image.Image, seed: int) -> torch.Tensor:
        reseed(seed)
        return self.transform(image)

    def view(self, image: Image.Image, key: str, epoch: int) -> tuple[torch.Tensor, int]:
        """The unmixed augmented view of one sample in `epoch`, and its seed."""
        seed = view_seed(self.run_seed, epoch, key)
        with seeded_globals() as reseed:
            return self._view(reseed, image, seed), seed

    def _pair(self, reseed, images: Sequence[Image.Image], keys: Sequence[str], epoch: int):
        seeds = [view_seed(self.run_seed, epoch, k) for k in keys]
        views = [self._view(reseed, im, s) for im, s in zip(images, seeds)]
        if len(views) == 1:
            return views, seeds, MixParams()
        params = self._mix_params(reseed, keys, epoch, *views[0].shape[-2:])
        return list(mix_pair(views[0], views[1], params)), seeds, params

    def _mix_params(self, reseed, keys: Sequence[str], epoch: int, height: int, width: int) -> MixParams:
        reseed(derive_seed(self.run_seed, epoch, TAG_PAIR, *keys))
        return draw_mix(self.recipe, height, width)

    def mix_params(self, keys: Sequence[str], epoch: int, height: int, width: int) -> MixParams:
        """The Mixup/CutMix parameters of the pair (keys[0], keys[1]) in `epoch`."""
        with seeded_globals() as reseed:
            return self._mix_params(reseed, keys, epoch, height, width)

    def view_at(self, records: Sequence, position: int, epoch: int, shard: str, shard_no: int = 0) -> View:
        """The mixed view of one sample (`records[position]`, manifest records): decodes its pair only."""
        pairs = pair_positions(len(records), self.run_seed, epoch, shard, self.recipe.mixes)
        members = next(p for p in pairs if position in p)
        members = members[:1] if members[0] == members[1] else members
        images = [decode_image(records[p].data, records[p].key) for p in members]
        views, seeds, params = self.pair(images, [records[p].key for p in members], epoch)
        i = members.index(position)
        own, partner = records[position], records[members[-1 - i]]
        return View(views[i], own.key, own.index, position, shard_no, epoch, seeds[i], own.label, partner.index,
                    partner.label, params.lam, fingerprint(views[i]))

    def pair(self, images: Sequence[Image.Image], keys: Sequence[str], epoch: int):
        """The mixed views of a pair (one image: unmixed), their own seeds and the mix parameters."""
        with seeded_globals() as reseed:
            return self._pair(reseed, images, keys, epoch)

    def shard_views(self, images: Sequence[Image.Image], keys: Sequence[str], labels: Sequence[int],
                    indices: Sequence[int], epoch: int, shard: str, shard_no: int = 0,
                    fingerprint_every: int = 1) -> Iterator[View]:
        """Every mixed view of one shard for `epoch`, pair by pair.

        Fingerprints are computed for positions divisible by `fingerprint_every` (0: none); others get None.
        """
        pairs = pair_positions(len(images), self.run_seed, epoch, shard, self.recipe.mixes)
        for start in range(0, len(pairs), PAIRS_PER_CONTEXT):
            made = []
            with seeded_globals() as reseed:  # never held across a yield: the caller may use the generators
                for a, b in pairs[start : start + PAIRS_PER_CONTEXT]:
                    members = (a,) if a == b else (a, b)
                    made.append((members, *self._pair(reseed, [images[p] for p in members], [keys[p] for p in members], epoch)))
            for members, views, seeds, params in made:
                for own, partner, view, seed in zip(members, members[::-1], views, seeds):
                    checked = fingerprint_every and own % fingerprint_every == 0
                    yield View(view, keys[own], indices[own], own, shard_no, epoch, seed, labels[own], indices[partner],
                               labels[partner], params.lam, fingerprint(view) if checked else None)
