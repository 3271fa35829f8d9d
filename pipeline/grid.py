"""Picture grids of views, so a person can look at what a recipe does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


@dataclass
class Tile:
    """One view to show and its caption (e.g. its mix partner and weight)."""

    view: torch.Tensor
    caption: str = ""


def to_pil(view: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo normalisation of a (3, H, W) view and return it as an RGB image."""
    x = view * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def view_grid(rows: Sequence[Sequence[Tile]], row_labels: Sequence[str], mean, std, cell: int = 96,
              gap: int = 6) -> Image.Image:
    """A labelled grid: one row per sample holding its views side by side, each scaled to `cell` px (nearest) over
    its caption (up to two lines)."""
    font = ImageFont.load_default()
    line = 12
    label_w = max(line, max(6 * max(len(t) for t in s.splitlines()) for s in row_labels) + gap)
    width = label_w + max(1, max(len(r) for r in rows)) * (cell + gap) + gap
    height = gap + len(rows) * (cell + 2 * line + gap)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (row, text) in enumerate(zip(rows, row_labels)):
        y = gap + i * (cell + 2 * line + gap)
        draw.multiline_text((2, y + cell // 3), text, fill=(0, 0, 0), font=font)
        for k, tile in enumerate(row):
            x = label_w + k * (cell + gap)
            grid.paste(to_pil(tile.view, mean, std).resize((cell, cell), Image.NEAREST), (x, y))
            draw.multiline_text((x, y + cell + 1), tile.caption, fill=(90, 90, 90), font=font, spacing=0)
    return grid
