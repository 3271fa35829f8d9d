"""Picture grids of views, so a person can look at what a recipe does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GAP = 8  # between rows, between columns and around the grid
INNER = 2  # between the views of one cell
EMPTY = (236, 236, 236)  # a cell whose sample has no view in its column
LABEL_SIZE = 11
CAPTION_SIZES = range(11, 6, -1)  # the largest that fits the cells, else the smallest, captions cut to fit


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


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 2


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut to `width` px, an ellipsis marking the cut."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _caption_font(cells, cell: int):
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [line for row in cells for tiles in row for t in tiles for line in t.caption.splitlines()]
    for size in CAPTION_SIZES:
        font = ImageFont.load_default(size)
        if all(draw.textlength(line, font=font) <= cell for line in lines):
            return font
    return font


@dataclass(frozen=True)
class GridLayout:
    """Where a grid's parts lie, in pixels: a label column, a header row, then one row per sample; a column holds as
    many views side by side as its fullest cell, each `cell` px square over its caption lines."""

    cell: int
    label_w: int
    header_h: int
    caption_h: int
    row_h: int  # the views and their captions, or the row label where it is taller
    views: tuple[int, ...]  # views per column
    rows: int

    @classmethod
    def of(cls, cells: Sequence[Sequence[Sequence[Tile]]], row_labels: Sequence[str], cell: int,
           per_cell: int = 1) -> "GridLayout":
        """The layout of `cells` (row, column -> tiles) with these row labels, every column at least `per_cell`
        views wide."""
        draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_font = ImageFont.load_default(LABEL_SIZE)
        label_w = max((draw.textlength(line, font=label_font) for s in row_labels for line in s.splitlines()),
                      default=0)
        label_h = max((len(s.splitlines()) for s in row_labels), default=0) * _line_height(label_font)
        lines = max((len(t.caption.splitlines()) for row in cells for tiles in row for t in tiles), default=0)
        caption_h = lines * _line_height(_caption_font(cells, cell))
        columns = max((len(row) for row in cells), default=0)
        views = tuple(max(per_cell, max((len(row[j]) for row in cells), default=1)) for j in range(columns))
        return cls(cell, int(label_w) + GAP, _line_height(label_font) + GAP // 2, caption_h,
                   max(cell + caption_h, label_h), views, len(cells))

    def x(self, column: int, k: int = 0) -> int:
        """Left edge of view `k` of a cell in `column`."""
        before = sum(n * self.cell + (n - 1) * INNER + GAP for n in self.views[:column])
        return GAP + self.label_w + before + k * (self.cell + INNER)

    def width_of(self, column: int) -> int:
        """Width of `column`'s cells."""
        n = self.views[column]
        return n * self.cell + (n - 1) * INNER

    def y(self, row: int) -> int:
        """Top edge of `row`'s views."""
        return GAP + self.header_h + row * (self.row_h + GAP)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid."""
        return self.x(len(self.views)), self.y(self.rows)


def view_grid(cells: Sequence[Sequence[Sequence[Tile]]], row_labels: Sequence[str], column_labels: Sequence[str],
              mean, std, cell: int = 96, per_cell: int = 1) -> Image.Image:
    """A labelled grid: one row per sample, one column per `column_labels` entry (named in a header row); a cell
    holds the sample's tiles for its column side by side (none: an empty grey cell), each scaled to `cell` px
    (nearest) over its caption, cut to the cell's width; every column is at least `per_cell` views wide."""
    layout = GridLayout.of(cells, row_labels, cell, per_cell)
    grid = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    label_font, caption_font = ImageFont.load_default(LABEL_SIZE), _caption_font(cells, cell)
    for j, text in enumerate(column_labels):
        if draw.textlength(text, font=label_font) > layout.width_of(j):  # 'epoch 12' over a narrow column: '12'
            text = _fit(draw, text.split()[-1], label_font, layout.width_of(j))
        x = layout.x(j) + (layout.width_of(j) - draw.textlength(text, font=label_font)) / 2
        draw.text((x, GAP // 2), text, fill=(0, 0, 0), font=label_font)
    line = _line_height(caption_font)
    for i, (row, text) in enumerate(zip(cells, row_labels)):
        y = layout.y(i)
        top = y + max(0, (cell - len(text.splitlines()) * _line_height(label_font)) // 2)
        draw.multiline_text((GAP, top), text, fill=(0, 0, 0), font=label_font, spacing=2)
        for j, tiles in enumerate(row):
            if not tiles:
                draw.rectangle((layout.x(j), y, layout.x(j) + layout.width_of(j) - 1, y + cell - 1), fill=EMPTY)
            for k, tile in enumerate(tiles):
                x = layout.x(j, k)
                grid.paste(to_pil(tile.view, mean, std).resize((cell, cell), Image.NEAREST), (x, y))
                for n, text_line in enumerate(tile.caption.splitlines()):
                    draw.text((x, y + cell + n * line), _fit(draw, text_line, caption_font, cell), fill=(90, 90, 90),
                              font=caption_font)
    return grid
