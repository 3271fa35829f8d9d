"""Augmentation recipes: a typed, hashed description of the training views, built with timm."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from replaykd import recipes
from replaykd.errors import ReplayKDError
from replaykd.io import read_yaml_mapping

RECIPE_DIR = Path(recipes.__file__).resolve().parent  # manifests/recipes/ in the repository
# Fields that change neither a view's pixels nor its mix: the smoothing of the label targets, the evaluation crop.
STUDENT_ONLY = ("smoothing", "eval_crop_pct")
# What one Mixup/CutMix draw (the choice of the two, lambda, the box) serves: every pair of a pairing group (as timm's
# batch mode serves a batch: DeiT's), each pair (both its views), or each view (timm's elem mode).
MIX_MODES = ("group", "pair", "elem")
STORED_BEFORE_MIX_MODE = "pair"  # the mixing of every store made before recipes had mix_mode


def stored_views(views: dict) -> dict:
    """Recorded `views()` with what they leave out said: no `mix_mode` is the pairs of a store from before it."""
    return {"mix_mode": STORED_BEFORE_MIX_MODE, **views}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training view and its mixed label; defaults are DeiT's."""

    input_size: int = 224
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mix_mode: str = "group"  # one Mixup/CutMix draw per: group (a pairing group, as timm's batch mode), pair, elem
    smoothing: float = 0.1
    repeats: int = 3
    eval_crop_pct: float = 0.875
    name: str = "deit"

    def __post_init__(self):
        for f in ("scale", "ratio", "mean", "std"):
            object.__setattr__(self, f, tuple(float(v) for v in getattr(self, f)))
        if self.input_size < 4:
            raise ReplayKDError(f"recipe {self.name}: input_size must be at least 4, got {self.input_size}")
        for f in ("hflip", "re_prob", "mix_prob", "switch_prob", "smoothing"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ReplayKDError(f"recipe {self.name}: {f} must be in [0, 1], got {getattr(self, f)}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ReplayKDError(f"recipe {self.name}: repeats must be an integer >= 1, got {self.repeats!r}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ReplayKDError(f"recipe {self.name}: mixup and cutmix alphas must be >= 0")
        if self.mix_mode not in MIX_MODES:
            raise ReplayKDError(f"recipe {self.name}: mix_mode must be one of {', '.join(MIX_MODES)}, got "
                                f"{self.mix_mode!r}")

    @property
    def mixes(self) -> bool:
        """Whether views are mixed in pairs (Mixup or CutMix)."""
        return self.mix_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def as_dict(self) -> dict:
        """Every field as plain JSON types (the name is a label, not part of the recipe)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def views(self) -> dict:
        """The fields that shape the training views and what the teacher sees of them: a teacher cache is tied to
        these only (label smoothing and the evaluation crop are each student's own). `mix_mode` 'pair', what every
        store held before the field existed, is left out (and so is any `mix_mode` of a recipe that does not mix), so
        those stores keep their identity."""
        return {k: v for k, v in self.as_dict().items()
                if k not in STUDENT_ONLY and not (k == "mix_mode" and (v == STORED_BEFORE_MIX_MODE or not self.mixes))}

    @property
    def views_hash(self) -> str:
        """sha256 of the canonical JSON of `views()`: equal views, equal hashes, whatever the file."""
        return hashlib.sha256(json.dumps(self.views(), sort_keys=True).encode()).hexdigest()

    def train_transform(self, separate: bool = False):
        """timm's training transform for one image (crop, flip, RandAugment, normalise, erase); with `separate`,
        its three stages: (crop, flip), (RandAugment or colour jitter), (to tensor, normalise, erase)."""
        from timm.data import create_transform

        return create_transform(
            self.input_size, is_training=True, scale=self.scale, ratio=self.ratio, hflip=self.hflip,
            color_jitter=self.color_jitter, auto_augment=self.auto_augment, interpolation=self.interpolation,
            mean=self.mean, std=self.std, re_prob=self.re_prob, re_mode=self.re_mode, re_count=self.re_count,
            separate=separate,
        )

    def eval_transform(self):
        """timm's evaluation transform (resize, centre crop, normalise)."""
        from timm.data import create_transform

        return create_transform(self.input_size, is_training=False, interpolation=self.interpolation,
                                crop_pct=self.eval_crop_pct, mean=self.mean, std=self.std)

    @classmethod
    def of_views(cls, views: dict, name: str) -> "Recipe":
        """The recipe a store's recorded `views()` describe."""
        return cls.from_dict(stored_views(views), name)

    @classmethod
    def from_dict(cls, d: dict, name: str) -> "Recipe":
        """A recipe from a mapping; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ReplayKDError(f"recipe {name}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**{"name": name, **d})

    @classmethod
    def load(cls, spec: str | Path) -> "Recipe":
        """A recipe from a YAML/JSON file path, or a built-in one by name (manifests/recipes/: 'deit', ...)."""
        path = Path(spec)
        if not path.exists():
            path = RECIPE_DIR / f"{spec}.yaml"
        if not path.exists():
            names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
            raise ReplayKDError(f"recipe not found: {spec} (a file, or one of: {names})")
        data = read_yaml_mapping(path, "recipe", "options")
        return cls.from_dict(data, data.pop("name", path.stem))
