"""torchrun support: the process group, barriers and sums across ranks (each a no-op in a single process)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU); (rank, world).

    After an elastic restart (`--max-restarts`) the group meets under keys of its own attempt: torchrun's agent keeps
    one store across restarts, and the addresses a killed group left there would be read by the new one (which then
    connects to processes that are gone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                  timeout=timedelta(minutes=30))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"replaykd/attempt_{attempt}", store),
                                    rank=int(os.environ["RANK"]), world_size=world)
        else:
            dist.init_process_group(backend)
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
