"""Optional metric sinks of a training run, off by default: TensorBoard and Weights & Biases (as timm's train.py
offers W&B). Each needs its package (the `tensorboard` and `wandb` extras); a missing one is refused before a run
starts, not discovered after its first epoch."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from replaykd.errors import ReplayKDError

NEEDS = {"tensorboard": ("tensorboard", "--log-tensorboard"), "wandb": ("wandb", "--log-wandb")}


def check_available(wanted: list[str]) -> None:
    """Refuse a sink whose package is not installed, naming the extra that installs it."""
    for sink in wanted:
        package, flag = NEEDS[sink]
        if importlib.util.find_spec(package) is None:
            raise ReplayKDError(f"{flag} needs the {package} package, which is not installed: pip install "
                                f"'replaykd[{sink}]' (or pip install {package})")


class MetricSinks:
    """Each finished epoch's figures, sent to the sinks asked for (numbers only; nothing else leaves the run)."""

    def __init__(self, out: Path, tensorboard: bool, wandb: bool, project: str, config: dict):
        self.writers = []
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(Path(out) / "tensorboard"))
            self.writers.append((lambda row, step, w=writer: [w.add_scalar(k, v, step) for k, v in row.items()],
                                 writer.close))
        if wandb:
            import wandb as wandb_lib

            run = wandb_lib.init(project=project, name=Path(out).name, dir=str(out), config=config, resume="allow")
            self.writers.append((lambda row, step, r=run: r.log(row, step=step), run.finish))

    def log(self, row: dict) -> None:
        """One epoch's numeric figures, at that epoch."""
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        for write, _ in self.writers:
            write(numbers, row["epoch"])

    def close(self) -> None:
        """Flush and close every sink."""
        for _, close in self.writers:
            close()
