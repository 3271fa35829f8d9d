"""The training process's own randomness (drop path, the initialisation): seeded per rank, saved and restored whole.

Views draw nothing from these generators (each view seeds its own), so they decide only what differs between
ranks by design: DeiT seeds `seed + rank` after an identical initialisation, so that stochastic depth draws other
masks on every rank. A checkpoint holds every rank's CPU and CUDA generator states, and each rank takes its own
back on resume.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def seed_rank(seed: int, rank: int) -> None:
    """Seed this rank's CPU and CUDA generators with `seed + rank` (after the model is built the same on all)."""
    torch.manual_seed(seed + rank)


def local_state(device: torch.device) -> dict:
    """This process's generator states (CPU, and the device's when it is a GPU)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def all_states(device: torch.device) -> list[dict]:
    """Every rank's generator states, in rank order (a collective under torchrun)."""
    state = local_state(device)
    if not dist.is_initialized():
        return [state]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def restore(states: list[dict], rank: int, device: torch.device) -> None:
    """Set this rank's generators to its saved states."""
    state = states[rank]
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
