"""Where tensors run: the device, its mixed precision and memory layout, and the machine's name for reports."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext

import torch

from pipeline.errors import ReplayKDError


def pick_device(spec: str) -> torch.device:
    """'auto' -> this rank's GPU when there is one, else the CPU; 'cuda' without a GPU is an error."""
    spec = getattr(spec, "value", spec)
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


def set_threads(threads: int | None, workers: int) -> int:
    """Compute threads of this process: `threads`, else its share of the cores that are idle when it starts (shared
    with the other processes torchrun started on this machine), at least 1.

    Loader workers are not subtracted: at small sizes they need a fraction of a core, and a core they leave idle is
    lost to a process that counted it theirs (measured on 2 cores: one demo student with 2 workers trained at 518 img/s
    on 1 thread, 611 on 2). What other runs already keep busy is left to them, so two runs started one after the
    other do not both take every core."""
    cores = _cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = threads or max(1, min(len(cores), round(idle_cores(cores))) // local)
    torch.set_num_threads(n)
    return n


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def idle_cores(cores: list[int], seconds: float = 0.25) -> float:
    """How many of `cores` were idle over the next `seconds` (from /proc/stat; all of them where it cannot say)."""
    def ticks() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    v = [int(x) for x in values]
                    out[int(name[3:])] = (v[3] + v[4], sum(v[:8]))  # idle + iowait, total (less guest time)
        return out

    try:
        before = ticks()
        time.sleep(seconds)
        after = ticks()
    except (OSError, ValueError, IndexError):
        return float(len(cores))
    idle = 0.0
    for c in cores:
        if c in before and c in after and after[c][1] > before[c][1]:
            idle += (after[c][0] - before[c][0]) / (after[c][1] - before[c][1])
        else:
            idle += 1.0
    return idle


def process_seconds() -> float:
    """Seconds since this process started (imports included), for start-up figures; 0 where /proc cannot say."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
