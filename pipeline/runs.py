"""A training run on disk: its resolved options, per-epoch log, checkpoint, resume and final summary.

Files: `config.yaml` (every option, as resolved), `log.jsonl` (one line per finished epoch), `train_state.pt`
(weights, optimiser, EMA, RNG and position; one atomic file, so weights and optimiser never disagree),
`checkpoint.safetensors` (the weights alone, for users), `summary.json` (written once, when the run is done:
a finished run is never rewritten).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from pipeline.errors import ReplayKDError
from pipeline.io import atomic_path, read_jsonl, write_json_atomic

CONFIG, LOG, STATE, WEIGHTS, SUMMARY = "config.yaml", "log.jsonl", "train_state.pt", "checkpoint.safetensors", "summary.json"


@dataclass
class Resumed:
    """Where a resumed run continues: the next epoch and optimiser step."""

    epoch: int
    step: int


class RunFolder:
    """The run folder OUT of one training run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.created = False

    def summary(self) -> dict | None:
        """The finished run's summary, or None while it is not finished."""
        f = self.path / SUMMARY
        return json.loads(f.read_text()) if f.exists() else None

    def config(self) -> dict:
        """The resolved options the run was started with."""
        return yaml.safe_load((self.path / CONFIG).read_text())

    def log(self) -> list[dict]:
        """The finished epochs' log lines."""
        f = self.path / LOG
        return read_jsonl(f) if f.exists() else []

    def check_new(self) -> None:
        """Refuse to start a new run over one that holds finished epochs."""
        if (self.path / STATE).exists() or (self.path / SUMMARY).exists():
            raise ReplayKDError(f"{self.path} holds a run already; pass --resume to continue it, or choose another --out")

    def check_resume(self, plan: dict) -> None:
        """Refuse to resume a run that is not there, or one started with another plan (options that fix it)."""
        if not (self.path / STATE).exists():
            raise ReplayKDError(f"nothing to resume in {self.path} (no {STATE}); start the run without --resume")
        saved = self.config()
        diff = [f"{k} ({saved.get(k)!r} then, {v!r} now)" for k, v in plan.items() if saved.get(k) != v]
        if diff:
            raise ReplayKDError(f"--resume with a different plan than {self.path} was started with: {', '.join(diff)}")

    def create(self, config: dict) -> None:
        """Start the folder: the resolved options and an empty log (any half-started run's files are replaced)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.created = True
        with atomic_path(self.path / CONFIG) as tmp:
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        (self.path / LOG).write_text("")

    def discard_if_empty(self) -> None:
        """After a failure: remove the folder this run created if no epoch finished (nothing is lost)."""
        if self.created and not (self.path / STATE).exists():
            for name in (CONFIG, LOG):
                (self.path / name).unlink(missing_ok=True)
            if self.path.exists() and not any(self.path.iterdir()):
                shutil.rmtree(self.path)

    def append_log(self, row: dict) -> None:
        """One finished epoch's line."""
        with open(self.path / LOG, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(self, model: torch.nn.Module, optimizer, ema, epoch: int, step: int) -> None:
        """Checkpoint after `epoch`: the weights for users, then the state that resume reads (written last)."""
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with atomic_path(self.path / WEIGHTS) as tmp:
            save_file(weights, str(tmp))
        state = {"epoch": epoch, "step": step, "model": weights, "optimizer": optimizer.state_dict(),
                 "rng": torch.get_rng_state(), "ema": ema.state_dict() if ema is not None else None}
        with atomic_path(self.path / STATE) as tmp:
            torch.save(state, tmp)

    def restore(self, model: torch.nn.Module, optimizer, ema) -> Resumed:
        """Load the last checkpoint into the model, optimiser and EMA; where to continue."""
        state = torch.load(self.path / STATE, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        return Resumed(state["epoch"] + 1, state["step"])

    def finish(self, summary: dict) -> dict:
        """Write the summary (the run is done) and return it."""
        write_json_atomic(self.path / SUMMARY, summary)
        return summary


def mean_rate(log: list[dict]) -> float:
    """The run's training images/s: all epochs' images over all epochs' training seconds (evaluation excluded)."""
    seconds = sum(r["train_seconds"] for r in log)
    return sum(r["images"] for r in log) / seconds if seconds > 0 else 0.0
