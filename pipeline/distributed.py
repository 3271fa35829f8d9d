"""torchrun support: the process group, barriers and sums across ranks (each a no-op in a single process)."""
from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist

# How long ranks wait for each other at start (a node may take minutes to load its data); and how long a rank tries a
# published store before it takes it for a killed attempt's.
STORE_TIMEOUT = timedelta(minutes=30)
PROBE_TIMEOUT = timedelta(seconds=5)
ATTEMPT_KEY, TOKEN_KEY = "replaykd/attempt_store", "replaykd/token"


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank = int(os.environ["RANK"])
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=_attempt_store(rank, world), rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _attempt_store(rank: int, world: int) -> dist.Store:
    """A store of this attempt's own, where the group meets.

    torchrun's agent keeps one store across elastic restarts, so the addresses a killed group left there would be
    read by the next one; and no key names the attempt on every rank alike (TORCHELASTIC_RESTART_COUNT counts only
    the restarts of each rank's own node: after one node's worker dies, that node says 1 and the other 0). So rank 0
    (on the agent store's node) serves a fresh store and publishes its port and a token in the agent's; the other
    ranks connect to the published one, and one they cannot reach, or whose token differs, belongs to a killed
    attempt (attempts never overlap: the agents stop every worker before they start the next), so they read again."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(host, port, world, is_master=False, timeout=STORE_TIMEOUT)
    if rank == 0:
        own = dist.TCPStore(host, 0, world, is_master=True, timeout=STORE_TIMEOUT, wait_for_workers=False)
        token = uuid.uuid4().hex
        own.set(TOKEN_KEY, token)
        agent.set(ATTEMPT_KEY, f"{own.port}:{token}")
        return own
    deadline = time.monotonic() + STORE_TIMEOUT.total_seconds()
    while time.monotonic() < deadline:
        published_port, token = agent.get(ATTEMPT_KEY).decode().split(":")
        try:
            own = dist.TCPStore(host, int(published_port), world, is_master=False, timeout=PROBE_TIMEOUT)
            if own.get(TOKEN_KEY).decode() == token:
                own.set_timeout(STORE_TIMEOUT)
                return own
        except (RuntimeError, ValueError):  # DistStoreError (a RuntimeError): nothing serves there any more
            pass
        time.sleep(0.2)
    raise RuntimeError(f"rank {rank}: rank 0 did not publish a store of this attempt within {STORE_TIMEOUT}")


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes shared files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


def restarted() -> bool:
    """Whether this attempt follows an elastic restart of any node's workers (the same answer on every rank).

    torchrun's TORCHELASTIC_RESTART_COUNT counts only the restarts a node's own failures used: a node whose workers
    were restarted because another node's worker died (a membership change, which costs no --max-restarts) still
    says 0, so ranks deciding alone would disagree, one resuming and the other starting afresh."""
    count = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))])
    if dist.is_initialized():
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else count.device
        count = count.to(on)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item()) > 0


def sum_across_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise sum of a CPU tensor over all ranks (nccl needs it on the GPU for the reduction)."""
    if not dist.is_initialized():
        return values
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()
