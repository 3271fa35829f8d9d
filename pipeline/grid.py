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


def view_grid(cells: Sequence[Sequence[Sequence[Tile]]], row_labels: Sequence[str], column_labels: Sequence[str],
              mean, std, cell: int = 96, gap: int = 6) -> Image.Image:
    """A labelled grid: one row per sample, one column per epoch; a cell holds that sample's views in that epoch
    side by side (none: the sample is not in that epoch), each scaled to `cell` px (nearest) over its caption."""
    font = ImageFont.load_default()
    line = 12
    per_column = [max(1, max(len(row[j]) for row in cells)) for j in range(len(column_labels))]
    label_w = max(line, max(8 * len(s) for s in row_labels) // 2 + gap)
    widths = [n * (cell + gap) for n in per_column]
    height = line + gap + len(cells) * (cell + line + gap) + gap
    grid = Image.new("RGB", (label_w + sum(widths) + gap, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    x0 = [label_w + sum(widths[:j]) for j in range(len(widths))]
    for j, text in enumerate(column_labels):
        draw.text((x0[j], 2), text, fill=(0, 0, 0), font=font)
    for i, (row, text) in enumerate(zip(cells, row_labels)):
        y = line + gap + i * (cell + line + gap)
        draw.multiline_text((2, y + cell // 3), text, fill=(0, 0, 0), font=font)
        for j, tiles in enumerate(row):
            if not tiles:
                draw.text((x0[j] + cell // 2 - 4, y + cell // 2 - 6), "-", fill=(160, 160, 160), font=font)
            for k, tile in enumerate(tiles):
                x = x0[j] + k * (cell + gap)
                grid.paste(to_pil(tile.view, mean, std).resize((cell, cell), Image.NEAREST), (x, y))
                draw.text((x, y + cell + 1), tile.caption, fill=(90, 90, 90), font=font)
    return grid
