"""Teachers and students from timm by name, weights from local files only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ReplayKDError


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the checkpoint's identity in a cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(checkpoint: Path) -> dict:
    """The state dict of a .pth/.safetensors file (plain, or wrapped in 'model'/'state_dict'), from local disk."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ReplayKDError(f"checkpoint not found: {checkpoint}")
    try:
        return timm.models.load_state_dict(str(checkpoint), use_ema=False)
    except Exception as exn:
        raise ReplayKDError(f"cannot read checkpoint {checkpoint}: {exn}") from exn


def load_weights(model: nn.Module, state: dict, checkpoint: Path) -> None:
    """Load `state` (read from `checkpoint`) strictly; a misfit is an error listing the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"
        raise ReplayKDError(
            f"checkpoint {checkpoint} does not fit {type(model).__name__}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; wrong shapes: "
            + (", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]) or "none"))
    model.load_state_dict(state, strict=True)


def create_classifier(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A timm model by name, randomly initialised (no download), with an error listing near names."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exn:
        if "Unknown model" in str(exn):
            near = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ReplayKDError(f"unknown timm model {name!r}; similar: {', '.join(near) or 'none'}") from exn
        raise


class Teacher(nn.Module):
    """A classifier that sees each view resized to its own input size (when that differs from the view's)."""

    def __init__(self, model: nn.Module, input_size: int | None = None):
        super().__init__()
        self.model, self.input_size = model, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.model(x)


def checkpoint_input_size(checkpoint: Path) -> int | None:
    """The input size in the JSON that `train-teacher` writes beside a checkpoint, if there is one."""
    side = Path(checkpoint).with_suffix(".json")
    return json.loads(side.read_text()).get("input_size") if side.exists() else None


def load_teacher(name: str, checkpoint: Path, num_classes: int, input_size: int | None = None,
                 device: torch.device | None = None) -> Teacher:
    """The teacher `name` with weights from the local `checkpoint`, in eval mode (channels_last on GPU).

    `input_size` None: the size recorded beside the checkpoint, else the views' own size.
    """
    model = create_classifier(name, num_classes)
    state = read_checkpoint(checkpoint)
    head = model.pretrained_cfg.get("classifier")
    weight = state.get(f"{head}.weight") if head else None
    if weight is not None and weight.shape[0] != num_classes:
        raise ReplayKDError(f"teacher checkpoint {checkpoint} has {weight.shape[0]} classes, the dataset has {num_classes}")
    load_weights(model, state, checkpoint)
    teacher = Teacher(model, input_size if input_size is not None else checkpoint_input_size(checkpoint)).eval()
    if device is not None:
        teacher = teacher.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    return teacher


def create_student(name: str, num_classes: int, img_size: int, patch_size: int | None = None,
                   drop_path: float = 0.1, **overrides) -> nn.Module:
    """A distilled DeiT from timm (cls + dist tokens) at the recipe's size, returning (cls, dist) when training."""
    kwargs = {"img_size": img_size, "drop_path_rate": drop_path, **{k: v for k, v in overrides.items() if v}}
    if patch_size:
        kwargs["patch_size"] = patch_size
    model = create_classifier(name, num_classes, **kwargs)
    if not hasattr(model, "set_distilled_training"):
        raise ReplayKDError(f"{name} has no distillation token; use a distilled DeiT such as deit_tiny_distilled_patch16_224")
    model.set_distilled_training(True)
    return model


class StudentHeads(nn.Module):
    """Both heads of a distilled DeiT in any mode, stacked: (2, batch, classes) = (cls, dist)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.student.forward_features(x)
        return torch.stack([self.student.head(feats[:, 0]), self.student.head_dist(feats[:, 1])])
