"""Weights a timm user can load: a safetensors file with a JSON beside it that says how.

The JSON holds the timm name, the constructor arguments (`model_args`), the class names and the pretrained config
(`pretrained_cfg`: classes, input size, normalisation, resize filter and crop, as timm's own configs do), so that

    info = json.load(open("checkpoint.json"))
    model = timm.create_model(info["model"], pretrained=True, **info["model_args"],
                              pretrained_cfg_overlay=dict(file="checkpoint.safetensors", **info["pretrained_cfg"]))

gives the trained model, and `timm.data.resolve_data_config(model=model)` its evaluation transform. The class count
must be in the overlay: timm drops a classifier whose size differs from its config's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from safetensors.torch import save_file
from torch import nn

from replaykd.errors import ReplayKDError
from replaykd.io import atomic_path, write_json_atomic


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input (timm's pretrained_cfg): normalisation, side, resize filter, evaluation crop."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    interpolation: str
    crop_pct: float = 0.875

    @classmethod
    def of(cls, cfg: dict) -> "Preprocessing":
        """From a timm pretrained_cfg (or the `pretrained_cfg` of an exported JSON)."""
        return cls(tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
                   int(cfg["input_size"][-1]), str(cfg.get("interpolation") or "bicubic"),
                   float(cfg.get("crop_pct") or 0.875))

    def pretrained_cfg(self, num_classes: int) -> dict:
        """The timm pretrained_cfg fields that describe it."""
        return {"num_classes": num_classes, "input_size": [3, self.input_size, self.input_size],
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "mean": list(self.mean),
                "std": list(self.std)}


def info_path(weights: Path) -> Path:
    """The JSON beside a weights file."""
    return Path(weights).with_suffix(".json")


def read_info(weights: Path) -> dict | None:
    """The JSON beside `weights`, or None."""
    f = info_path(weights)
    return json.loads(f.read_text()) if f.exists() else None


def export(model: nn.Module, weights: Path, name: str, model_args: dict, classes: list[str],
           preprocessing: Preprocessing, **extra) -> None:
    """Write `model`'s weights and the JSON that loads them with timm (atomically, weights first)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(info_path(weights), {
        "model": name, "model_args": model_args, "num_classes": len(classes), "classes": classes,
        "pretrained_cfg": preprocessing.pretrained_cfg(len(classes)), **extra,
        "load": "timm.create_model(model, pretrained=True, **model_args, pretrained_cfg_overlay=dict(file=WEIGHTS, "
                "**pretrained_cfg))"})


def eval_transform(model: nn.Module):
    """An exported model's own evaluation transform, as timm resolves it from the model's pretrained_cfg."""
    return create_transform(**resolve_data_config(model=model))


def load_exported(weights: Path, device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """An exported model, loaded through timm as the JSON beside it says, in eval mode; and that JSON."""
    info = read_info(weights)
    if not Path(weights).exists():
        raise ReplayKDError(f"checkpoint not found: {weights}")
    if info is None or "pretrained_cfg" not in info:
        raise ReplayKDError(f"{weights} has no {info_path(weights).name} beside it saying which model it is "
                            "(replaykd writes one beside every checkpoint it exports)")
    model = timm.create_model(info["model"], pretrained=True, **info["model_args"],
                              pretrained_cfg_overlay=dict(file=str(weights), **info["pretrained_cfg"]))
    return model.to(device or torch.device("cpu")).eval(), info
