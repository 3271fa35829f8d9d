"""The typed records that cross module borders: a view, a batch of views, a view's mixing and erasing, the
teacher's targets, a batch finished for a training step. They hold data and only what moving that data needs; they
import no behaviour module, so every module can use them and none circles back through them."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass
class TeacherTargets:
    """The teacher's top-k targets of one view or a batch: sorted probabilities (float16) and their classes."""

    probs: torch.Tensor
    classes: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> "TeacherTargets":
        """What the cache stores for teacher logits: softmax in float32, top-k, probabilities as float16."""
        probs, classes = logits.float().softmax(-1).topk(k, dim=-1)
        return cls(probs.half(), classes)

    @classmethod
    def stack(cls, rows: Sequence["TeacherTargets"]) -> "TeacherTargets":
        """One batch from per-view rows."""
        return cls(torch.stack([r.probs for r in rows]), torch.stack([r.classes for r in rows]))

    def to(self, device: torch.device) -> "TeacherTargets":
        """The same targets on `device`."""
        return TeacherTargets(self.probs.to(device, non_blocking=True), self.classes.to(device, non_blocking=True))

    def pin_memory(self) -> "TeacherTargets":
        """Page-locked copies, for asynchronous copies to the GPU."""
        return TeacherTargets(self.probs.pin_memory(), self.classes.pin_memory())


@dataclass
class TeacherEnsemble:
    """Several teachers' top-k targets of the same views (each with its own k) and each teacher's weight: the
    teacher they make is the weighted mean of their distributions (`pipeline/losses.py`)."""

    members: tuple[TeacherTargets, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class TeacherRecord:
    """One teacher of a student run as the run's files name it: its timm name (with its tag, or an hf-hub id), the
    weights file it was loaded from (None: its pretrained weights), their sha256, the cache its targets were read
    from (None: it ran online), its k and its weight in the mean."""

    name: str
    file: str | None
    sha256: str
    cache: str | None
    topk: int
    weight: float


@dataclass(frozen=True)
class MixParams:
    """How a pair is mixed: own-image weight `lam` and, for CutMix, the pasted box (y0, y1, x0, x1)."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


# How an erasing box is filled (timm's RandomErasing modes): zeros ('const'), one random colour ('rand'), or
# random values per pixel ('pixel').
FILL_ZERO, FILL_COLOUR, FILL_PIXEL = 0, 1, 2


@dataclass(frozen=True)
class Erase:
    """One random-erasing box of a view as timm drew it: where, and the values it writes (3 x height x width,
    float32, in normalised units), how they were drawn (`fill`), and the state of the view's torch generator before
    they were drawn (uint8; empty for zeros): a batch carries the state, not the values, and the consumer draws them
    again from it (`replaykd.augment.erase_values`)."""

    top: int
    left: int
    height: int
    width: int
    values: torch.Tensor
    fill: int = FILL_ZERO
    state: torch.Tensor = torch.zeros(0, dtype=torch.uint8)


@dataclass
class View:
    """One replayed training view: its uint8 pixels, the sample it shows and everything that decides its targets.

    `image` is (height, width, 3) uint8 after timm's PIL stages; `erase` and (`lam`, `box`) are what the float
    stages apply (`pipeline/finish.py`), with the partner's `partner_image` and `partner_erase` when the view is
    mixed. `slot` is its place among its unit's views (the cache's row); `partner` is the global index of the sample
    it is mixed with (its own index: unmixed) and `lam` the weight of its own image; `fingerprint` is None where the
    loader did not compute it (the partner's pixels are proven by the partner's own fingerprint). `teacher` holds
    the view's cached teacher targets once the loader has attached them.
    """

    image: torch.Tensor
    key: str
    index: int
    position: int
    repeat: int
    slot: int
    shard_no: int
    epoch: int
    seed: int
    label: int
    partner: int
    partner_label: int
    lam: float
    box: tuple[int, int, int, int] | None = None
    erase: tuple[Erase, ...] = ()
    partner_image: torch.Tensor | None = None
    partner_erase: tuple[Erase, ...] = ()
    fingerprint: int | None = None
    teacher: TeacherTargets | None = None


@dataclass
class ViewBatch:
    """A collated batch: uint8 views and what their float steps need, label targets, where each view came from,
    and optional teacher targets.

    `images` are (M, H, W, 3) uint8 pixel rows in one or more chunks (the sub-batches a loader worker made:
    `concat`), each image once: view i shows row `image_rows[i]` and, for a mixing recipe, is mixed with row
    `partner_rows[i]` (a pair's two views in one batch share their two rows, as timm's Mixup mixes within a batch; a
    view whose partner is in another batch brings its partner's row along, so M <= 2N);
    `erase_boxes` rows are (pixel row, top, left, height, width, fill) and `erase_states` the torch generator state
    each box's values are drawn from (one row per box; zeros for a box of zeros): a few KB a box, where its values
    were 3 x 4 bytes a pixel;
    `mix_boxes` rows are CutMix boxes (y0, y1, x0, x1; -1: none) and `lams` each view's
    own weight. `Finisher` turns these into float views. `targets` are the mixed, label-smoothed targets
    lam * y(own) + (1 - lam) * y(partner). `fingerprints` is None unless every view has one; `teacher` is None unless
    the loader attached cached targets.
    """

    images: list[torch.Tensor]
    image_rows: torch.Tensor
    partner_rows: torch.Tensor | None
    erase_boxes: torch.Tensor
    erase_states: torch.Tensor
    mix_boxes: torch.Tensor
    lams: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    keys: list[str]
    indices: torch.Tensor
    repeats: torch.Tensor
    slots: torch.Tensor
    shard_nos: torch.Tensor
    epochs: torch.Tensor
    partners: torch.Tensor
    partner_labels: torch.Tensor
    fingerprints: torch.Tensor | None = None
    teacher: TeacherTargets | None = None
    worker: int = 0  # the loader worker that made it (its pieces are joined into one batch)

    def __len__(self) -> int:
        return len(self.keys)

    def __reduce__(self):
        # From a loader worker, torch sends every tensor through a shared-memory segment of its own, its descriptor
        # fetched over a socket: a round trip per tensor. Only the pixels are worth it; the small columns travel
        # inside the pickle.
        return _rebuilt_batch, tuple(value if f.name == "images" else _inline(value)
                                     for f, value in ((f, getattr(self, f.name)) for f in fields(self)))

    def pin_memory(self) -> "ViewBatch":
        """A copy with page-locked tensors (the DataLoader calls this when pin_memory is on)."""
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in pinned.items():
            if isinstance(value, (torch.Tensor, TeacherTargets)):
                pinned[name] = value.pin_memory()
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                pinned[name] = [chunk.pin_memory() for chunk in value]
        return ViewBatch(**pinned)

    @classmethod
    def concat(cls, batches: Sequence["ViewBatch"]) -> "ViewBatch":
        """One batch of several, in order: their pixels stay where they are (as chunks), the rest is joined."""
        if len(batches) == 1:
            return batches[0]
        # each batch's pixel rows follow the rows of the batches before it
        offsets = [0]
        for b in batches[:-1]:
            offsets.append(offsets[-1] + sum(len(c) for c in b.images))
        boxes = [b.erase_boxes + torch.tensor([o, 0, 0, 0, 0, 0]) for b, o in zip(batches, offsets)]

        def cat(name: str):
            values = [getattr(b, name) for b in batches]
            return None if any(v is None for v in values) else torch.cat(values)

        def rows(name: str):
            values = [getattr(b, name) for b in batches]
            return None if values[0] is None else torch.cat([v + o for v, o in zip(values, offsets)])

        teachers = [b.teacher for b in batches]
        return cls([c for b in batches for c in b.images], rows("image_rows"), rows("partner_rows"),
                   torch.cat(boxes), cat("erase_states"), cat("mix_boxes"), cat("lams"), cat("labels"),
                   cat("targets"), [k for b in batches for k in b.keys], cat("indices"), cat("repeats"), cat("slots"),
                   cat("shard_nos"), cat("epochs"), cat("partners"), cat("partner_labels"), cat("fingerprints"),
                   None if any(t is None for t in teachers) else TeacherTargets(torch.cat([t.probs for t in teachers]),
                                                                               torch.cat([t.classes for t in teachers])),
                   batches[0].worker)


def _inline(value):
    """A batch field as pickle carries it by value: tensors as numpy arrays (bfloat16 has none: left a tensor)."""
    if isinstance(value, torch.Tensor) and value.dtype != torch.bfloat16:
        return value.numpy()
    if isinstance(value, TeacherTargets):
        return TeacherTargets(*(_inline(v) for v in (value.probs, value.classes)))
    return value


def _tensor(value):
    """A field `_inline` made, back as it was."""
    if isinstance(value, TeacherTargets):
        return TeacherTargets(_tensor(value.probs), _tensor(value.classes))
    return torch.from_numpy(value) if hasattr(value, "__array_interface__") else value


def _rebuilt_batch(*values) -> ViewBatch:
    """A `ViewBatch` from the fields `ViewBatch.__reduce__` gave."""
    return ViewBatch(*(_tensor(v) for v in values))


@dataclass
class TrainBatch:
    """A batch as a training step takes it: the views finished on the device (normalised, erased, mixed), their
    mixed and label-smoothed targets there, the teacher's targets there (None: labels only), and the uint8 batch they
    came from (keys, epochs, slots, ...)."""

    images: torch.Tensor
    targets: torch.Tensor
    teacher: TeacherTargets | TeacherEnsemble | None
    views: ViewBatch

    def __len__(self) -> int:
        """Views in the batch."""
        return len(self.images)
