"""Which images a loader worker decodes, and when: as few decodes as its memory budget allows.

A decoded 500x375 photograph is ~750 KB (Pillow keeps RGB as 4 bytes a pixel), so a shard of 1000 is ~750 MB and
cannot stay decoded in every loader worker. Within `budget` bytes of decoded images a worker keeps:
- a whole shard, decoded once for all the epochs it makes from it (stage one), when it fits;
- else the images of one unit (an epoch of the shard: with r repeats about 1/r of the shard), decoded once for all
  their views;
- else the unit's images in groups, two groups at a time (a pair's two images may lie in different groups): each
  group pair's items are made together, so an image is decoded at most once per group it meets; with K groups a
  unit decodes its images (K + 1) / 2 times on average instead of once.
"""
from __future__ import annotations

import io
from collections import defaultdict
from typing import Iterator, Mapping, Sequence

from PIL import Image

from pipeline import replay

# Bytes Pillow holds per pixel of a decoded RGB image.
BYTES_PER_PIXEL = 4


def decoded_size(data: bytes) -> int:
    """The memory an encoded image takes once decoded, from its header alone (no pixel is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception:  # a corrupt image: its decode names it later
        return 0
    return width * height * BYTES_PER_PIXEL


def decode_steps(items: Sequence[Sequence[int]], sizes: Mapping[int, int],
                 budget: int) -> list[tuple[list[int], list[int]]]:
    """Work in steps of (positions to hold decoded, indices of `items` to make): every item once, with each of its
    positions held; at most `budget` bytes of images held at a time (or one group pair, when single images are
    larger). `items` lists each item's sample positions."""
    positions = sorted({p for item in items for p in item})
    if sum(sizes[p] for p in positions) <= budget:
        return [(positions, list(range(len(items))))]
    groups, group_of, held = [[]], {}, 0
    for p in positions:  # consecutive positions in groups of at most half the budget: two fit at a time
        if groups[-1] and held + sizes[p] > budget // 2:
            groups.append([])
            held = 0
        groups[-1].append(p)
        group_of[p] = len(groups) - 1
        held += sizes[p]
    by_pair: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        gs = sorted({group_of[p] for p in item})
        by_pair[(gs[0], gs[-1])].append(i)
    return [(groups[a] + (groups[b] if b != a else []), by_pair[(a, b)])
            for a in range(len(groups)) for b in range(a, len(groups)) if by_pair.get((a, b))]


class DecodedImages:
    """The images a worker holds decoded, by position: each step keeps the ones it needs again and decodes the
    rest (an error names `origin` and the key); `keep_all` keeps every image once decoded (a whole shard that fits
    the budget, for all its epochs)."""

    def __init__(self, records, origin: str, keep_all: bool = False):
        self.records, self.origin, self.keep_all, self.held = records, origin, keep_all, {}

    def hold(self, positions: Sequence[int]) -> dict:
        """Hold these positions decoded (others are dropped unless `keep_all`)."""
        held = dict(self.held) if self.keep_all else {}
        for p in positions:
            held[p] = self.held.get(p)
            if held[p] is None:
                held[p] = replay.decode_image(self.records[p].data, f"{self.origin}{self.records[p].key}")
        self.held = held
        return held


def steps_for(records, items: Sequence[Sequence[int]], budget: int) -> Iterator[tuple[list[int], list[int]]]:
    """`decode_steps` with each position's decoded size read from its image header."""
    sizes = {p: decoded_size(records[p].data) for item in items for p in item}
    return iter(decode_steps(items, sizes, budget))
