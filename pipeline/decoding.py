"""Which images a loader worker decodes, and when: as few decodes as its memory budget allows.

A decoded 500x375 photograph is ~750 KB (Pillow keeps RGB as 4 bytes a pixel), so a shard of 1000 is ~750 MB and
cannot stay decoded in every loader worker. Within `budget` bytes of decoded images a worker keeps:
- a whole shard, decoded once for all the epochs it makes from it (stage one), when it fits;
- else the images of one unit (an epoch of the shard: with r repeats about 1/r of the shard), decoded once for all
  their views, when they fit;
- else the unit's pairing groups (`pipeline/plan.py`: a pair's two views are of one group, ~64 samples), as many
  at a time as fit: each image is still decoded once per unit;
- and only a group too large for the budget alone (huge images) is cut into parts, two parts at a time (a pair's
  two images may lie in different parts), its images decoded (K + 1) / 2 times on average for K parts.
"""
from __future__ import annotations

import io
from collections import defaultdict
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from replaykd import replay

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
    positions held; at most `budget` bytes of images held at a time (or one part pair, when single images are
    larger). `items` lists each item's sample positions. Items that share a position belong together (a pairing
    group): steps hold whole groups while they fit, so that each position is decoded once."""
    steps: list[tuple[list[int], list[int]]] = []
    held_positions, held_items, held = [], [], 0
    for positions, which in _groups(items):
        size = sum(sizes[p] for p in positions)
        if held_items and held + size > budget:
            steps.append((held_positions, held_items))
            held_positions, held_items, held = [], [], 0
        if size > budget:  # one group alone is too large: in parts
            steps += _in_parts([items[i] for i in which], which, sizes, budget)
            continue
        held_positions, held_items, held = held_positions + positions, held_items + which, held + size
    if held_items:
        steps.append((held_positions, held_items))
    return steps


def _groups(items: Sequence[Sequence[int]]) -> list[tuple[list[int], list[int]]]:
    """(positions, item indices) of each set of items linked by shared positions, in the order of their first
    item."""
    parent: dict[int, int] = {}

    def root(p: int) -> int:
        while parent.setdefault(p, p) != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for item in items:
        for p in item[1:]:
            parent[root(p)] = root(item[0])
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for i, item in enumerate(items):
        positions, which = groups.setdefault(root(item[0]), ([], []))
        which.append(i)
    for p in parent:
        groups[root(p)][0].append(p)
    return [(sorted(positions), which) for positions, which in groups.values()]


def _in_parts(items: Sequence[Sequence[int]], which: list[int], sizes: Mapping[int, int],
              budget: int) -> list[tuple[list[int], list[int]]]:
    """Steps for a group whose images exceed the budget: its positions in consecutive parts of at most half the
    budget, each pair of parts held together for the items that need both."""
    parts, part_of, held = [[]], {}, 0
    for p in sorted({p for item in items for p in item}):
        if parts[-1] and held + sizes[p] > budget // 2:
            parts.append([])
            held = 0
        parts[-1].append(p)
        part_of[p] = len(parts) - 1
        held += sizes[p]
    by_pair: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, item in zip(which, items):
        ps = sorted({part_of[p] for p in item})
        by_pair[(ps[0], ps[-1])].append(i)
    return [(parts[a] + (parts[b] if b != a else []), by_pair[(a, b)])
            for a in range(len(parts)) for b in range(a, len(parts)) if by_pair.get((a, b))]


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


def steps_for(records, items: Sequence[Sequence[int]], budget: int,
              known: np.ndarray) -> Iterator[tuple[list[int], list[int]]]:
    """`decode_steps` with each position's decoded size from `known` (sizes by position, -1 where not yet read: read
    from the image header and filled in here, so that a shard's headers are parsed once, not every epoch; a PNG's
    header costs about as much as a digit's decode)."""
    for p in {p for item in items for p in item}:
        if known[p] < 0:
            known[p] = decoded_size(records[p].data)
    return iter(decode_steps(items, known, budget))
