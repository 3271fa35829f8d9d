"""The float steps of the views, run where a batch is consumed: the GPU in training, the CPU in tests and verify.

In order, for each image of the batch (its pixel rows: a view's own, and its partner's): uint8 -> float and
normalise, through a per-channel table of 256 values made by timm's own ToTensor and Normalize (so a pixel gets
exactly the float timm's transform gives it);
random erasing, its values drawn again here from the generator states the worker sent (on a CPU generator, then
copied: a worker sends a few KB a box, not the values); then Mixup or CutMix of the view with its partner.
Plain eager ops with nothing a device could round its own way: a table look-up, copies, a select, and Mixup's two
float32 products and one sum (each correctly rounded, never fused). So a batch finishes to the same bits on every
device, and to the same bits as timm's whole transform followed by the replay's mixing.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from replaykd.augment import erase_values
from replaykd.recipe import Recipe
from replaykd.records import ViewBatch


def normalise_table(recipe: Recipe) -> torch.Tensor:
    """(3, 256) float32: the value timm's ToTensor + Normalize give each uint8 level in each channel."""
    _, _, final = recipe.train_transform(separate=True)
    to_tensor, normalise = final.transforms[:2]
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # one row of 256 RGB pixels
    return normalise(to_tensor(Image.fromarray(levels)))[:, 0, :].contiguous()


class Finisher:
    """Finishes uint8 `ViewBatch`es to float32 views on a device (channels_last on GPU)."""

    def __init__(self, recipe: Recipe):
        self.table = normalise_table(recipe)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # the flat table, channel offsets

    def __call__(self, batch: ViewBatch, device: torch.device) -> torch.Tensor:
        """The batch's float views on `device`, (N, 3, H, W)."""
        if device not in self._on:
            self._on[device] = (self.table.to(device).view(-1), torch.arange(3, dtype=torch.int32, device=device) * 256)
        pixels = self._to_float(batch.images, device)
        if len(batch.erase_boxes):
            boxes = batch.erase_boxes.tolist()
            # drawn on the CPU here, from the states the worker sent, then copied over at once
            values = torch.cat([erase_values(fill, state, 3, h, w).view(-1)
                                for (_, _, _, h, w, fill), state in zip(boxes, batch.erase_states)])
            values, start = values.to(device, non_blocking=True), 0
            for row, top, left, h, w, _ in boxes:
                pixels[row, :, top:top + h, left:left + w] = values[start:start + 3 * h * w].view(3, h, w)
                start += 3 * h * w
        if batch.partner_rows is None:  # unmixed views: one pixel row each, in order
            x = pixels
        else:
            x = pixels[batch.image_rows.to(device, non_blocking=True)]
            self._mix(x, pixels, batch, device)
        return x.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)

    def _to_float(self, chunks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """(N, H, W, 3) uint8 in chunks -> (N, 3, H, W) float32 by table look-up; on the CPU numpy's take (5x faster
        there than torch's indexing), elsewhere a gather on the device (channels-last in memory). Same table, same
        bits."""
        if device.type == "cpu":
            height, width = chunks[0].shape[1:3]
            out = np.empty((sum(len(c) for c in chunks), 3, height, width), np.float32)
            row = 0
            for chunk in chunks:
                u8 = chunk.numpy()
                for c in range(3):
                    np.take(self.table[c].numpy(), u8[..., c], out=out[row:row + len(u8), c])
                row += len(u8)
            return torch.from_numpy(out)
        table, channel = self._on[device]
        parts = [table[c.to(device, non_blocking=True).int() + channel].permute(0, 3, 1, 2) for c in chunks]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _mix(x: torch.Tensor, pixels: torch.Tensor, batch: ViewBatch, device: torch.device) -> None:
        """Mix the views `x` (a copy of their own rows) with their partners' rows of `pixels`, in place."""
        _, _, height, width = x.shape
        # Which rows mix or cut is decided on the CPU, where the parameters are: the device never waits for a mask.
        # A row is read before it is written, and mixed and cut rows are apart: each row is mixed from unmixed rows.
        cut = batch.mix_boxes[:, 0] >= 0
        mixup = ((batch.lams < 1) & ~cut).nonzero().squeeze(1)
        if len(mixup):
            lam, rows = batch.lams[mixup], mixup.to(device, non_blocking=True)
            partner = pixels[batch.partner_rows[mixup].to(device, non_blocking=True)]
            # lam and 1 - lam as float32, each rounded once from float64, as numpy's weak scalars in the replay
            own = lam.float().to(device).view(-1, 1, 1, 1)
            other = (1.0 - lam).float().to(device).view(-1, 1, 1, 1)
            x[rows] = x[rows] * own + partner * other
        cutmix = cut.nonzero().squeeze(1)
        if len(cutmix):
            b, rows = batch.mix_boxes[cutmix].to(device), cutmix.to(device, non_blocking=True)
            partner = pixels[batch.partner_rows[cutmix].to(device, non_blocking=True)]
            ys = torch.arange(height, device=device).view(1, -1, 1)
            xs = torch.arange(width, device=device).view(1, 1, -1)
            inside = ((ys >= b[:, 0, None, None]) & (ys < b[:, 1, None, None])
                      & (xs >= b[:, 2, None, None]) & (xs < b[:, 3, None, None])).unsqueeze(1)
            x[rows] = torch.where(inside, partner, x[rows])
