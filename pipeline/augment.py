"""timm's training augmentation with every random draw taken from generators the view owns.

timm's transforms draw from the process-wide generators: Python's `random` (the crop, RandAugment's magnitudes and
signs, the erasing boxes), numpy's (RandAugment's choice of ops, Mixup/CutMix) and torch's (the flip, colour jitter,
the erasing values). Any other thread of the process may draw from those between a seeding and its use (botocore's
retry back-off does, in object-store threads), so a view made through them is not a pure function of its seed.
Here the same draws, in timm's order, come from a `Draws` of the view's own; the transforms are configured by timm
(`Recipe.train_transform`) and the pixel operations are timm's and torchvision's own, so a view is bit-identical to
what timm's transform makes from globals seeded with the view's seed in a quiet process (tests/test_augment.py
checks each step and the whole recipe against timm).
"""
from __future__ import annotations

import math
import random
import threading
from contextlib import contextmanager
from functools import partial
from typing import Callable

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from timm.data import auto_augment as aa
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from replaykd.errors import ReplayKDError
from replaykd.recipe import Recipe
from replaykd.records import FILL_COLOUR, FILL_PIXEL, FILL_ZERO, Erase, MixParams


class Draws:
    """Generators of one view: Python's, numpy's (legacy RandomState, as `np.random`) and torch's CPU generator,
    seeded from one seed as `random.seed`, `np.random.seed` and `torch.manual_seed` seed the global ones."""

    def __init__(self):
        # built once per thread and reseeded per view: building a RandomState costs ~130 us, seeding one ~1.5 us
        self.py = random.Random(0)
        self.np = np.random.RandomState(0)
        self.torch = torch.Generator()

    def seed(self, seed: int) -> "Draws":
        """Reseed all three with `seed`."""
        self.py = random.Random(seed)
        self.np.seed(seed)
        self.torch.manual_seed(seed)
        return self


_LOCAL = threading.local()


def draws(seed: int) -> Draws:
    """This thread's own generators, reseeded with `seed` (no other thread can reach them)."""
    mine = getattr(_LOCAL, "draws", None)
    if mine is None:
        mine = _LOCAL.draws = Draws()
    return mine.seed(seed)


# --- the PIL steps ------------------------------------------------------------------------------------------
def crop_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """timm's RandomResizedCropAndInterpolation.get_params, drawing from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop(t: RandomResizedCropAndInterpolation, img: Image.Image, d: Draws) -> Image.Image:
    i, j, h, w = crop_box(*img.size, t.scale, t.ratio, d.py)
    interpolation = d.py.choice(t.interpolation) if isinstance(t.interpolation, (tuple, list)) else t.interpolation
    return F.resized_crop(img, i, j, h, w, t.size, interpolation)


def _flip(flip: Callable, t, img: Image.Image, d: Draws) -> Image.Image:
    return flip(img) if torch.rand(1, generator=d.torch) < t.p else img


def _color_jitter(t: T.ColorJitter, img: Image.Image, d: Draws) -> Image.Image:
    """torchvision's ColorJitter: a random order of the four adjustments, each factor uniform in its range."""
    order = torch.randperm(4, generator=d.torch)
    factors = [None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=d.torch))
               for r in (t.brightness, t.contrast, t.saturation, t.hue)]
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for i in order.tolist():
        if factors[i] is not None:
            img = adjust[i](img, factors[i])
    return img


def _negate(value: float, rng: random.Random) -> float:
    return -value if rng.random() > 0.5 else value


# timm's level functions that draw a sign (`_randomly_negate`, from Python's global generator), written out with
# the sign drawn from the view's generator; every other level function is called as timm's (`_check_op` proves
# each op of a recipe replays as timm's own).
_SIGNED_LEVELS: dict[str, Callable] = {
    "_rotate_level_to_arg": lambda m, hp, rng: (_negate((m / aa._LEVEL_DENOM) * 30., rng),),
    "_shear_level_to_arg": lambda m, hp, rng: (_negate((m / aa._LEVEL_DENOM) * 0.3, rng),),
    "_translate_abs_level_to_arg":
        lambda m, hp, rng: (_negate((m / aa._LEVEL_DENOM) * float(hp["translate_const"]), rng),),
    "_translate_rel_level_to_arg":
        lambda m, hp, rng: (_negate((m / aa._LEVEL_DENOM) * hp.get("translate_pct", 0.45), rng),),
    "_enhance_increasing_level_to_arg":
        lambda m, hp, rng: (max(0.1, 1.0 + _negate((m / aa._LEVEL_DENOM) * .9, rng)),),
}


def _code(fn) -> object:
    return (fn.func if isinstance(fn, partial) else fn).__code__


# What `_check_op` applies each op to: a small image, gradients on its left half and noise on its right (where
# resampling filters differ), and seeds that take each branch of an op's draws (applied or not, either sign, either
# filter) many times over.
_CHECK_IMAGE = Image.fromarray(np.concatenate([
    np.stack([*np.meshgrid(np.arange(0, 256, 16), np.arange(0, 256, 8)), np.full((32, 16), 127)], axis=-1),
    np.random.default_rng(0).integers(0, 256, (32, 16, 3))], axis=1).astype(np.uint8))
_CHECK_SEEDS = 16
_CHECKING = threading.Lock()  # one check at a time swaps timm's module attribute


@contextmanager
def _timm_draws_from(rng: random.Random):
    """timm's augmentation module drawing from `rng` instead of Python's global generator (its ops call
    `random.random()` and the like through the module attribute `random`, which this replaces for a moment)."""
    with _CHECKING:
        module = aa.random
        aa.random = rng
        try:
            yield
        finally:
            aa.random = module


def _check_op(op: aa.AugmentOp) -> None:
    """Refuse an op whose replay here is not timm's own: applied to one image with each of a few seeds, the op as
    `_augment_op` replays it must give the pixels timm's own op gives when timm draws from a generator seeded alike.
    So a timm release whose ops draw otherwise (or one such as GaussianBlurRand, which draws inside its pixel
    operation from a generator this replay does not own) is refused by name, whatever its code looks like."""
    import timm

    for seed in range(_CHECK_SEEDS):
        try:
            mine = _augment_op(op, _CHECK_IMAGE, random.Random(seed))
        except AttributeError as exn:  # a private of timm's that this replay reads is gone
            mine = exn
        with _timm_draws_from(random.Random(seed)):
            theirs = op(_CHECK_IMAGE)
        if isinstance(mine, Exception) or mine.tobytes() != theirs.tobytes():
            raise ReplayKDError(f"RandAugment op {op.name} of timm {timm.__version__} does not replay as timm makes "
                                "it (its draws differ from those replaykd takes from a view's own generators); "
                                "choose a recipe without it, or a timm release replaykd was tested with")


def _augment_op(op: aa.AugmentOp, img: Image.Image, rng: random.Random) -> Image.Image:
    """timm's AugmentOp.__call__, drawing from `rng`."""
    if op.prob < 1.0 and rng.random() > op.prob:
        return img
    magnitude = op.magnitude
    if op.magnitude_std > 0:
        magnitude = (rng.uniform(0, magnitude) if op.magnitude_std == float("inf")
                     else rng.gauss(magnitude, op.magnitude_std))
    magnitude = max(0., min(magnitude, op.magnitude_max or aa._LEVEL_DENOM))
    level = op.level_fn
    if level is None:
        args = ()
    elif getattr(level, "__name__", None) in _SIGNED_LEVELS:
        args = _SIGNED_LEVELS[level.__name__](magnitude, op.hparams, rng)
    else:
        args = level(magnitude, op.hparams)
    kwargs = dict(op.kwargs)
    # timm's geometric ops pick a resampling filter at random (after the level) when given several
    if isinstance(kwargs["resample"], (list, tuple)) and "_check_args_tf" in _code(op.aug_fn).co_names:
        kwargs["resample"] = rng.choice(kwargs["resample"])
    return op.aug_fn(img, *args, **kwargs)


def _rand_augment(t: aa.RandAugment, img: Image.Image, d: Draws) -> Image.Image:
    ops = d.np.choice(t.ops, t.num_layers, replace=t.choice_weights is None, p=t.choice_weights)
    for op in ops:
        img = _augment_op(op, img, d.py)
    return img


def _auto_augment(t: aa.AutoAugment, img: Image.Image, d: Draws) -> Image.Image:
    for op in d.py.choice(t.policy):
        img = _augment_op(op, img, d.py)
    return img


def _step(t) -> Callable[[Image.Image, Draws], Image.Image]:
    """One of timm's PIL steps as a function of (image, the view's draws)."""
    if isinstance(t, RandomResizedCropAndInterpolation):
        return partial(_crop, t)
    if isinstance(t, T.RandomHorizontalFlip):
        return partial(_flip, F.hflip, t)
    if isinstance(t, T.RandomVerticalFlip):
        return partial(_flip, F.vflip, t)
    if isinstance(t, T.ColorJitter):
        return partial(_color_jitter, t)
    if isinstance(t, (aa.RandAugment, aa.AutoAugment)):
        for op in t.ops if isinstance(t, aa.RandAugment) else [op for sub in t.policy for op in sub]:
            _check_op(op)
        return partial(_rand_augment if isinstance(t, aa.RandAugment) else _auto_augment, t)
    raise ReplayKDError(f"augmentation step {type(t).__name__} ({t!r}): replaykd replays RandomResizedCrop, flips, "
                        "colour jitter, RandAugment and AutoAugment from a view's own generators, not this one; "
                        "choose a recipe without it")


# --- random erasing ----------------------------------------------------------------------------------------
def _erase(t: RandomErasing, channels: int, height: int, width: int, d: Draws) -> tuple[Erase, ...]:
    """timm's RandomErasing._erase, drawing from the view's generators: the boxes and the values it would write."""
    if d.py.random() > t.probability:
        return ()
    area, boxes = height * width, []
    count = t.min_count if t.min_count == t.max_count else d.py.randint(t.min_count, t.max_count)
    for _ in range(count):
        for _ in range(10):
            target_area = d.py.uniform(t.min_area, t.max_area) * area / count
            aspect_ratio = math.exp(d.py.uniform(*t.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top, left = d.py.randint(0, height - h), d.py.randint(0, width - w)
                fill = FILL_PIXEL if t.per_pixel else FILL_COLOUR if t.rand_color else FILL_ZERO
                state = d.torch.get_state() if fill != FILL_ZERO else _NO_STATE
                boxes.append(Erase(top, left, h, w, _fill(fill, channels, h, w, d.torch), fill, state))
                break
    return tuple(boxes)


_NO_STATE = torch.zeros(0, dtype=torch.uint8)


def _fill(fill: int, channels: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A box's values as timm's RandomErasing draws them (`_get_pixels`), from `generator`."""
    if fill == FILL_PIXEL:
        return torch.empty((channels, height, width)).normal_(generator=generator)
    if fill == FILL_COLOUR:
        return torch.empty((channels, 1, 1)).normal_(generator=generator).expand(channels, height, width).contiguous()
    return torch.zeros((channels, height, width))


def erase_values(fill: int, state: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """The values of an erasing box, drawn again from the generator state they were first drawn from: on a CPU
    generator wherever the batch is finished, so they are the worker's values to the bit on any device."""
    generator = torch.Generator()
    if fill != FILL_ZERO:
        generator.set_state(state.clone())  # its own storage: torch reads a state in a view of a larger one wrongly
    return _fill(fill, channels, height, width, generator)


class Augmentation:
    """A recipe's training augmentation as functions of the view's `Draws`: the PIL steps (crop, flip, RandAugment
    or colour jitter) on an image, and the random-erasing boxes of a view of a given size."""

    def __init__(self, recipe: Recipe):
        primary, secondary, final = recipe.train_transform(separate=True)
        self.steps = [_step(t) for t in (*primary.transforms, *secondary.transforms)]
        erasing = [t for t in final.transforms if isinstance(t, RandomErasing)]
        self.erasing = erasing[0] if erasing else None

    def pixels(self, image: Image.Image, d: Draws) -> torch.Tensor:
        """The view's uint8 pixels (height, width, 3) after the PIL steps."""
        for step in self.steps:
            image = step(image, d)
        return torch.from_numpy(np.array(image, dtype=np.uint8))

    def erase(self, pixels: torch.Tensor, d: Draws) -> tuple[Erase, ...]:
        """The erasing boxes of a view with these pixels (drawn after its PIL steps, as in timm's transform: the
        float steps between them draw nothing)."""
        if self.erasing is None:
            return ()
        height, width, channels = pixels.shape
        return _erase(self.erasing, channels, height, width, d)


# --- Mixup / CutMix ----------------------------------------------------------------------------------------
def draw_mix(recipe: Recipe, height: int, width: int, rs: np.random.RandomState) -> MixParams:
    """A pair's Mixup/CutMix parameters as timm's Mixup draws them (its `_params_per_batch` with CutMix's square box
    and corrected lambda, `cutmix_bbox_and_lam`), from `rs`."""
    if not recipe.mixes or rs.rand() >= recipe.mix_prob:
        return MixParams()
    use_cutmix = rs.rand() < recipe.switch_prob if recipe.mixup > 0 and recipe.cutmix > 0 else recipe.cutmix > 0
    alpha = recipe.cutmix if use_cutmix else recipe.mixup
    lam = float(rs.beta(alpha, alpha))
    if not use_cutmix:
        return MixParams(lam)
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rs.randint(0, height), rs.randint(0, width)
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
    lam = 1. - (y1 - y0) * (x1 - x0) / float(height * width)
    return MixParams(float(lam), (int(y0), int(y1), int(x0), int(x1)))
