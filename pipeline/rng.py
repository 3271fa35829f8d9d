"""The training process's own randomness (the initial weights, drop path): generators the run owns, not torch's
global one, which any thread may draw from at any moment. (Dropout and DropBlock at rates above 0, which no built-in
student uses, still draw from the global one.)

Views draw nothing from these generators (each view seeds its own), so they decide only what differs between
ranks by design: DeiT seeds `seed + rank` after an identical initialisation, so that stochastic depth draws other
masks on every rank. The initial weights are drawn as timm draws them, in timm's order, from a CPU generator of
the run's own seeded with its init seed; drop path's masks from the rank's generator on the device. A checkpoint holds every rank's generator state, and each rank takes its own back
on resume.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from timm.layers import DropPath
from torch.overrides import TorchFunctionMode

# torch's functions that draw from a generator, each taking a `generator` argument (torch.nn.init's dispatch to
# the mode as a whole, so their inner draws are reached through this argument too)
_DRAWS = frozenset({
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.bernoulli_, torch.Tensor.random_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.normal, torch.bernoulli, torch.multinomial,
    torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.nn.init.kaiming_uniform_,
    torch.nn.init.kaiming_normal_, torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
    torch.nn.init.orthogonal_, torch.nn.init.sparse_,
})


class _DrawFrom(TorchFunctionMode):
    """Gives torch's random functions called without a generator this one (modes are per thread: no other thread
    is affected, and no other thread's draws reach it)."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DRAWS and kwargs.get("generator") is None:
            kwargs = {**kwargs, "generator": self.generator}
        return func(*args, **kwargs)


@contextmanager
def drawing_from(seed: int):
    """Within, this thread's torch draws come from a CPU generator seeded with `seed` (build a model's initial
    weights here: the same weights whatever other threads draw meanwhile)."""
    with _DrawFrom(torch.Generator().manual_seed(seed)):
        yield


class _Shared:
    """A generator that copies of a model (its EMA) share rather than copy."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __deepcopy__(self, memo):
        return self


class OwnDropPath(DropPath):
    """timm's DropPath with its masks drawn from the run's generator (`own_drop_path`)."""

    owner: _Shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `drop_path`, drawing from the run's generator."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep, generator=self.owner.generator)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask


def rank_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """This rank's generator on `device`, seeded with `seed + rank`."""
    return torch.Generator(device=device).manual_seed(seed + rank)


def own_drop_path(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Make each of timm's DropPath modules in `model` draw its masks from `generator`."""
    owner = _Shared(generator)
    for module in model.modules():
        if type(module) is DropPath:
            module.__class__ = OwnDropPath
            module.owner = owner


def all_states(generator: torch.Generator) -> list[dict]:
    """Every rank's generator state, in rank order (a collective under torchrun), keyed by its device type."""
    state = {generator.device.type: generator.get_state()}
    if not dist.is_initialized():
        return [state]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def restore(states: list[dict], rank: int, generator: torch.Generator) -> bool:
    """Set this rank's generator to its saved state (a checkpoint from before the run owned its generator saved
    torch's global ones, from which drop path drew on that device: the same state). False where the checkpoint was
    made on another kind of device: the generator keeps its fresh seed."""
    state = states[rank].get(generator.device.type)
    if state is None:
        return False
    generator.set_state(state)
    return True
