"""Training plumbing shared by the stages: devices, schedules, evaluation, distributed set-up."""
from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from pipeline.errors import ReplayKDError


def pick_device(spec: str) -> torch.device:
    """'auto' -> this rank's GPU when there is one, else the CPU; 'cuda' without a GPU is an error."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ReplayKDError("--device cuda asked for, but no GPU is visible")
        if spec == "cuda":
            spec = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return torch.device(spec)


def device_name(device: torch.device | None = None) -> str:
    """The GPU's name, or the CPU's model and core count, for reports."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "CPU") if os.path.exists("/proc/cpuinfo") else "CPU"
    return f"{model}, {os.cpu_count()} cores"


def autocast(device: torch.device):
    """bf16 autocast on GPU; float32 (no autocast) on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of views on `device` (channels_last on GPU, where convolutions and bf16 run fastest that way)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def cosine_lr(step: int, total: int, warmup: int, base: float, min_lr: float = 1e-6) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay from `base` to `min_lr` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have the label among the top-k logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1)
    return [int(hits[:, : min(k, logits.shape[1])].any(1).sum()) for k in ks]


@torch.inference_mode()
def evaluate(heads: dict, loader: DataLoader, device: torch.device, model: nn.Module) -> dict:
    """Top-1/top-5 (percent) of each head: `heads` maps a name to a function of the model's output."""
    model.eval()
    counts = torch.zeros(len(heads), 2, dtype=torch.float64)
    n = 0
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device)
        with autocast(device):
            out = model(x)
        for i, fn in enumerate(heads.values()):
            counts[i] += torch.tensor(topk_correct(fn(out).float(), y), dtype=torch.float64)
        n += len(y)
    totals = torch.cat([counts.flatten(), torch.tensor([float(n)], dtype=torch.float64)])
    if dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    counts, n = totals[:-1].view(len(heads), 2), totals[-1].item()
    if n == 0:
        raise ReplayKDError("the evaluation split is empty")
    return {f"{name}_top{k}": 100.0 * counts[i, j].item() / n for i, name in enumerate(heads) for j, k in enumerate((1, 5))}
