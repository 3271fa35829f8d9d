"""torchrun support: the process group, barriers and sums across ranks (each a no-op in a single process)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


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


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes shared files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


def sum_across_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum of a CPU tensor over all ranks (nccl needs it on the GPU for the reduction)."""
    if not dist.is_initialized():
        return values
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()
