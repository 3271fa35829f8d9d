"""The reference a replayed view must equal: timm's own transforms drawing from the process-wide generators, seeded
with the view's seed in a quiet process (nothing else draws between the seeding and the view)."""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def seeded_globals(seed: int):
    """Python's, numpy's and torch's CPU generators seeded with `seed` inside; their states restored on exit."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
