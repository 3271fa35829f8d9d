"""Teachers and students from timm by name, weights from local files only."""
from __future__ import annotations

import hashlib
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


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a .pth/.safetensors file (plain, or wrapped in 'model'/'state_dict') strictly, with a clear error."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ReplayKDError(f"checkpoint not found: {checkpoint}")
    try:
        state = timm.models.load_state_dict(str(checkpoint), use_ema=False)
    except Exception as exn:
        raise ReplayKDError(f"cannot read checkpoint {checkpoint}: {exn}") from exn
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


def checkpoint_classes(model: nn.Module, checkpoint: Path) -> int | None:
    """How many classes the checkpoint's classifier head has (None when it has no such head)."""
    head = model.pretrained_cfg.get("classifier")
    state = timm.models.load_state_dict(str(checkpoint), use_ema=False)
    weight = state.get(f"{head}.weight") if head else None
    return int(weight.shape[0]) if weight is not None else None


def load_teacher(name: str, checkpoint: Path, num_classes: int, input_size: int | None = None) -> Teacher:
    """The teacher `name` with weights from the local `checkpoint`, in eval mode."""
    model = create_classifier(name, num_classes)
    if not Path(checkpoint).exists():
        raise ReplayKDError(f"teacher checkpoint not found: {checkpoint}")
    n = checkpoint_classes(model, checkpoint)
    if n is not None and n != num_classes:
        raise ReplayKDError(f"teacher checkpoint {checkpoint} has {n} classes, the dataset has {num_classes}")
    load_weights(model, checkpoint)
    return Teacher(model, input_size).eval()


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
