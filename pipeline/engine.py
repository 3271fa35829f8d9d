"""The training loop of both training stages, as DeiT's engine.py: one epoch of optimiser steps, and evaluation."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from replaykd import cputime
from replaykd.device import autocast, process_seconds
from replaykd.distributed import sum_across_ranks
from replaykd.errors import ReplayKDError
from replaykd.progress import Progress
from replaykd.records import TrainBatch

# Steps between loss readings for the log and the progress bar (each reads the loss back from the device): DeiT's
# print frequency.
LOG_EVERY = 10


@dataclass
class EpochStats:
    """What one epoch of training did, summed over ranks (seconds are this rank's)."""

    loss: float
    loss_base: float
    loss_distill: float
    lr: float
    images: int
    steps: int
    seconds: float
    cpu_seconds: float | None  # the ranks' processes and their loader workers (None: not measurable here)
    step_losses: list[tuple[int, float]]  # (step, loss of this rank's batch) every `log_every` steps

    @property
    def images_per_s(self) -> float:
        """Images per second of all ranks together."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(model: nn.Module, criterion: nn.Module, batches: Iterable[TrainBatch],
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, lr_at: Callable[[int], float],
                    step: int, clip_grad: float | None = None, ema=None, total: int | None = None,
                    show_progress: bool = True, progress: dict | None = None,
                    log_every: int = LOG_EVERY) -> tuple[EpochStats, int]:
    """One pass over `batches` (a `ReplayLoader`'s, on `device`): the loss from `criterion` of the model's output,
    the batch's label targets and its teacher's targets.

    `lr_at(step)` sets the learning rate before each optimiser step; returns the epoch's stats (the loss of every
    `log_every`-th step among them) and the next step.
    `progress['step']`, when given, follows the step (for a message saying where a run stopped), and
    `progress['first_step']` says when this process finished its first step (seconds since it started).
    """
    model.train()
    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    images, lr, first, t0, cpu0 = 0, float("nan"), step, time.perf_counter(), cputime.with_workers()
    logged = []
    bar = Progress(total=total, desc=f"epoch {epoch}", unit="img", unit_scale=True, leave=False,
                   disable=not show_progress)
    try:
        for batch in batches:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                parts = criterion(model(batch.images), batch.targets, batch.teacher)
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(plain.parameters(), clip_grad)
            optimizer.step()
            if ema is not None:
                ema.update(plain, step=step)
            n = len(batch)
            sums += torch.stack([parts.loss.detach(), parts.base.detach(), parts.distill.detach()]).double() * n
            images += n
            bar.update(n)
            if step % log_every == 0:
                loss = parts.loss.item()
                _check_finite(loss, epoch, step)
                logged.append((step, loss))
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            step += 1
            if progress is not None:
                progress["step"] = step
                if "first_step" not in progress:
                    progress["first_step"] = process_seconds()
                    if show_progress:
                        Progress.write(f"first step {progress['first_step']:.1f} s after this process started")
    finally:
        bar.close()  # before any error message: a left-open bar would share its line
    seconds, cpu = time.perf_counter() - t0, cputime.with_workers()
    totals = sum_across_ranks(torch.cat([sums.cpu(), torch.tensor([images, cpu - cpu0 if cpu0 is not None else 0.0],
                                                                    dtype=torch.float64)]), device)
    count = max(1.0, totals[3].item())
    _check_finite(totals[0].item(), epoch, step)
    return EpochStats(totals[0].item() / count, totals[1].item() / count, totals[2].item() / count, lr,
                      int(totals[3].item()), step - first, seconds, None if cpu0 is None else totals[4].item(),
                      logged), step


def _check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise ReplayKDError(f"loss is {loss} at epoch {epoch}, step {step}; lower --lr or set --clip-grad")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have the label among the top-k logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1)
    return [int(hits[:, : min(k, logits.shape[1])].any(1).sum()) for k in ks]


@torch.inference_mode()
def evaluate(heads: dict[str, Callable], loader: Iterable, device: torch.device, model: nn.Module) -> dict:
    """Top-1/top-5 (percent) of each head over (images, labels) batches, as `{prefix}top1`, and the loss of the
    first head (`eval_loss`, cross-entropy to the labels); `heads` maps a prefix to a function of the model's
    output."""
    model.eval()
    counts = torch.zeros(len(heads), 2, dtype=torch.float64)
    loss, n = 0.0, 0
    for images, labels in loader:
        x = images.to(device, non_blocking=True)
        y = labels.to(device)
        with autocast(device):
            out = model(x)
        for i, fn in enumerate(heads.values()):
            logits = fn(out).float()
            counts[i] += torch.tensor(topk_correct(logits, y), dtype=torch.float64)
            if i == 0:
                loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    totals = sum_across_ranks(torch.cat([counts.flatten(), torch.tensor([loss, float(n)], dtype=torch.float64)]),
                              device)
    counts, loss, n = totals[:-2].view(len(heads), 2), totals[-2].item(), totals[-1].item()
    if n == 0:
        raise ReplayKDError("the evaluation split is empty")
    return {"eval_loss": loss / n, **{f"{name}top{k}": 100.0 * counts[i, j].item() / n for i, name in enumerate(heads)
                                     for j, k in enumerate((1, 5))}}
