"""A training run on disk: its resolved options, per-epoch log, checkpoint, resume and final summary.

Files: `config.yaml` (every option, as resolved); `train_state.pt` (weights, optimiser, EMA, every rank's RNG
states, the schedule the run was made with and the finished epochs' log rows: one atomic file, so weights,
optimiser and log never disagree); `log.jsonl` and `summary.csv` (timm's columns), rewritten from that state after
each checkpoint, so a crash between the two never leaves a row the checkpoint does not hold; the exported weights
(`pipeline/export.py`); `summary.json` (written once, when the run is done: a finished run is never rewritten).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import torch
import yaml

from replaykd.errors import ReplayKDError
from replaykd.io import atomic_path, read_jsonl, read_yaml_mapping, write_json_atomic

CONFIG, LOG, CSV, STATE, SUMMARY = "config.yaml", "log.jsonl", "summary.csv", "train_state.pt", "summary.json"
WEIGHTS, EMA_WEIGHTS = "checkpoint.safetensors", "checkpoint-ema.safetensors"


def csv_row(row: dict) -> dict:
    """A log row in timm's summary.csv columns: epoch, train_*, eval_*, lr."""
    out = {"epoch": row["epoch"], "train_loss": row["loss"], "train_loss_base": row["loss_base"],
           "train_loss_distill": row["loss_distill"]}
    out.update({f"eval_{k}" if not k.startswith("eval_") else k: v for k, v in row.items()
                if k == "eval_loss" or "top1" in k or "top5" in k})
    out["lr"] = row["lr"]
    return out


class RunFolder:
    """The run folder OUT of one training run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.created = False

    def summary(self) -> dict | None:
        """The finished run's summary, or None while it is not finished."""
        f = self.path / SUMMARY
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except ValueError:
            raise ReplayKDError(f"{f} is not JSON (damaged): the finished run's summary cannot be read; delete it and "
                                f"run the run's train-student command with --resume, which writes it again from {STATE}"
                                ) from None

    def config(self) -> dict:
        """The resolved options the run was started with."""
        f = self.path / CONFIG
        if not f.exists():
            raise ReplayKDError(f"{f} is missing, so the options {self.path} was started with are unknown: put it back "
                                "from a copy of the run folder, or start the run again in another --out")
        return read_yaml_mapping(f, "run options", "option names to values")

    def log(self) -> list[dict]:
        """The finished epochs' log lines."""
        f = self.path / LOG
        return read_jsonl(f) if f.exists() else []

    def has_state(self) -> bool:
        """Whether a checkpoint exists (at least one epoch finished)."""
        return (self.path / STATE).exists()

    def check_new(self) -> None:
        """Refuse to start a new run over one that holds finished epochs."""
        if self.has_state() or (self.path / SUMMARY).exists():
            raise ReplayKDError(f"{self.path} holds a run already; pass --resume to continue it, or choose another --out")

    def check_resume(self, plan: dict, batching: dict, defaults: dict) -> None:
        """Refuse to resume a run that is not there, one started with another plan (options that fix it), or one
        whose `batching` options (those that decide which views share a batch) changed. An option its config.yaml
        does not name (it predates the option) had its default, `defaults`."""
        if not self.has_state():
            raise ReplayKDError(f"nothing to resume in {self.path} (no {STATE}); start the run without --resume")
        saved = {**defaults, **self.config()}
        diff = [f"{k} ({saved.get(k)!r} then, {v!r} now)" for k, v in plan.items() if saved.get(k) != v]
        if diff:
            raise ReplayKDError(f"--resume with a different plan than {self.path} was started with: {', '.join(diff)}")
        changed = {"--" + k.replace("_", "-"): (saved.get(k), v) for k, v in batching.items() if saved.get(k) != v}
        if changed:
            what = ", ".join(f"{flag} {'unset' if old is None else old} then, {'unset' if new is None else new} now"
                             for flag, (old, new) in changed.items())
            again = " ".join(f"without {flag}" if old is None else f"{flag} {old}" for flag, (old, _) in changed.items())
            raise ReplayKDError(f"--resume of {self.path} with other loader options than it was started with ({what}): "
                                "they decide which views share a batch, so the resumed run would not reproduce the "
                                f"uninterrupted one; resume with the old values ({again})")

    def create(self, config: dict) -> None:
        """Start the folder: the resolved options and an empty log (any half-started run's files are replaced)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.created = True
        with atomic_path(self.path / CONFIG) as tmp:
            tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        self._write_log([])

    def discard_if_empty(self) -> None:
        """After a failure: remove the folder this run created if no epoch finished (nothing is lost)."""
        if self.created and not self.has_state():
            for name in (CONFIG, LOG, CSV):
                (self.path / name).unlink(missing_ok=True)
            if self.path.exists() and not any(self.path.iterdir()):
                shutil.rmtree(self.path)

    def save(self, state: dict) -> None:
        """Checkpoint (the state that resume reads: 'epoch', 'step', 'rows', weights, optimiser, ...), then the log
        and summary.csv rewritten from its rows."""
        with atomic_path(self.path / STATE) as tmp:
            torch.save(state, tmp)
        self._write_log(state["rows"])

    def _write_log(self, rows: list[dict]) -> None:
        with atomic_path(self.path / LOG) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        table = [csv_row(r) for r in rows]
        columns = list(dict.fromkeys(k for r in table for k in r)) or ["epoch", "train_loss", "lr"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        with atomic_path(self.path / CSV) as tmp:
            tmp.write_text(buf.getvalue())

    def restore(self) -> dict:
        """The last checkpoint's state, on the CPU (each rank moves what it takes to its own device)."""
        f = self.path / STATE
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exn:  # torch's own messages suggest unsafe loading; what matters is that it is damaged
            raise ReplayKDError(f"{f} cannot be read (damaged or cut short), so the run cannot continue from it: "
                                "start it again without --resume in another --out") from exn

    def finish(self, summary: dict) -> dict:
        """Write the summary (the run is done) and return it."""
        write_json_atomic(self.path / SUMMARY, summary)
        return summary


def mean_rate(log: list[dict], seconds: str = "train_seconds") -> float | None:
    """The run's training images per second: all epochs' images over all epochs' `seconds` (evaluation excluded;
    `train_cpu_seconds`: per CPU second of its processes and loader workers). None where an epoch has no such
    figure."""
    if any(r.get(seconds) is None for r in log):
        return None
    total = sum(r[seconds] for r in log)
    return sum(r["images"] for r in log) / total if total > 0 else 0.0


def schedule_differences(saved: dict, now: dict) -> list[str]:
    """What would change the learning-rate schedule of a resumed run (world size, batch, steps per epoch)."""
    out = []
    for key, what in (("world_size", "processes"), ("batch_size", "batch size per process")):
        if saved.get(key) != now[key]:
            out.append(f"{what} {saved.get(key)} then, {now[key]} now")
    if not out and saved.get("steps_per_epoch") != now["steps_per_epoch"]:
        out.append("steps per epoch differ (the data set changed)")
    return out
