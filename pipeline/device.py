"""Where tensors run: the device, its mixed precision and memory layout, and the machine's name for reports."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext

import torch

from replaykd.errors import ReplayKDError
from replaykd.threads import share


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


def set_threads(threads: int | None, workers: int = 0, device: torch.device | None = None) -> int:
    """Set this process's compute threads to `threads`, else to its share of the cores now, given its loader
    `workers` and the `device` it computes on (`replaykd.threads.share`); called again at each epoch, it follows runs
    that started or ended since. The number set."""
    n = share(threads, workers, device is not None and device.type != "cpu")
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


def process_seconds() -> float:
    """Seconds since this process started (imports included), for start-up figures; 0 where /proc cannot say."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
