"""The learning-rate schedule of DeiT (timm's cosine with linear warm-up), per optimiser step."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable


def cosine_lr(step: int, total: int, warmup: int, base: float, min_lr: float = 1e-6) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay from `base` to `min_lr` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def step_schedule(steps_per_epoch: list[int], warmup_epochs: int, base: float, min_lr: float = 1e-6
                  ) -> Callable[[int], float]:
    """The learning rate of each optimiser step of a run whose epochs take `steps_per_epoch` steps, warming up over
    the first `warmup_epochs` epochs."""
    return partial(cosine_lr, total=sum(steps_per_epoch), warmup=sum(steps_per_epoch[:warmup_epochs]), base=base,
                   min_lr=min_lr)
