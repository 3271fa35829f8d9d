"""Picture grids of views, so a person can look at what a recipe does."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_pil(view: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo normalisation of a (3, H, W) view and return it as an RGB image."""
    x = view * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def view_grid(rows: Sequence[Sequence[torch.Tensor | None]], mean, std, cell: int = 96, gap: int = 4) -> Image.Image:
    """A grid image: one row per sample, one column per epoch (None: blank); cells scaled to `cell` px (nearest)."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    grid = Image.new("RGB", (n_cols * (cell + gap) + gap, n_rows * (cell + gap) + gap), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, view in enumerate(row):
            if view is None:  # the sample is not in this epoch
                continue
            tile = to_pil(view, mean, std).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (gap + j * (cell + gap), gap + i * (cell + gap)))
    return grid
