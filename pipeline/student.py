"""Students: any timm classifier, built and checked against the views before a run starts.

A distilled DeiT keeps its two heads and DeiT's loss (class token on the labels, distillation token on the teacher);
any other model learns both from its one head, as timm's logit distillation does. Without distillation a distilled
DeiT is replaced by DeiT's own baseline, the same model without its distillation token (the architecture DeiT's table
compares against), unless it is asked to stay itself: then both heads learn the labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from replaykd.errors import ReplayKDError
from replaykd.models import check_model_name

# Options of the command line that become model constructor arguments, by argument name.
OPTION_OF = {"img_size": "--img-size", "patch_size": "--patch-size", "depth": "--depth", "embed_dim": "--embed-dim",
             "num_heads": "--num-heads"}


def baseline_name(name: str) -> str:
    """DeiT's baseline for a distilled DeiT (deit_tiny_distilled_patch16_224 -> deit_tiny_patch16_224); else `name`."""
    arch, _, tag = name.partition(".")
    plain = arch.replace("_distilled", "")
    return plain if plain != arch and timm.is_model(plain) else name


@dataclass
class Student:
    """A built student: the model, the timm name it was built as, its constructor arguments, and whether it has
    DeiT's two heads (class and distillation token)."""

    model: nn.Module
    name: str
    model_args: dict
    two_heads: bool

    def heads(self) -> dict:
        """What evaluation reports, by prefix: the model's own prediction (for a distilled DeiT the average of its
        heads, as DeiT evaluates) and, for two heads, each head alone."""
        if not self.two_heads:
            return {"": lambda out: out}
        return {"": lambda out: (out[0] + out[1]) / 2, "cls_": lambda out: out[0], "dist_": lambda out: out[1]}

    def eval_model(self, model: nn.Module | None = None) -> nn.Module:
        """`model` (default: the student; e.g. its EMA copy) with both heads' outputs in eval mode."""
        model = self.model if model is None else model
        return TwoHeads(model) if self.two_heads else model


class TwoHeads(nn.Module):
    """Both heads of a distilled DeiT in any mode, stacked: (2, batch, classes) = (cls, dist)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.student.forward_features(x)
        return torch.stack([self.student.head(feats[:, 0]), self.student.head_dist(feats[:, 1])])


def build_student(name: str, num_classes: int, view_size: int, baseline: bool, drop_path: float,
                  overrides: dict) -> Student:
    """The student `name` (with `baseline`, a distilled DeiT is replaced by DeiT's baseline) for `view_size` px views,
    with the constructor `overrides` the user gave (None: not given). Every option is checked against the model
    before a run starts: one it does not take, a size it cannot see, a shape timm refuses, a patch that does not
    divide the views."""
    check_model_name(name)
    built = baseline_name(name) if baseline else name
    given = {k: v for k, v in overrides.items() if v is not None}
    if "img_size" in given and given["img_size"] != view_size:
        raise ReplayKDError(f"--img-size {given['img_size']} differs from the recipe's input_size {view_size}: the "
                            "views are made at the recipe's size (choose a recipe with the size you want)")
    kwargs = {"drop_path_rate": drop_path, "img_size": view_size, **given}
    model = None
    while model is None:
        try:
            model = timm.create_model(built, pretrained=False, num_classes=num_classes, **kwargs)
        except TypeError as exn:
            arg = next((k for k in kwargs if f"'{k}'" in str(exn)), None)
            if arg is None:
                raise ReplayKDError(f"student {built} cannot be built with {kwargs}: {exn}") from exn
            if arg in given:
                raise ReplayKDError(f"{OPTION_OF.get(arg, arg)} does not apply to {built} (it takes no {arg!r})") from exn
            del kwargs[arg]  # a default of ours the model does not take (a CNN has no img_size)
        except (AssertionError, ValueError, RuntimeError) as exn:
            shown = ", ".join(f"{OPTION_OF.get(k, k)} {v}" for k, v in given.items()) or "its defaults"
            raise ReplayKDError(f"student {built} cannot be built with {shown}: {exn or type(exn).__name__}") from exn
    _check_patches(model, view_size)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, view_size, view_size))
    except Exception as exn:
        raise ReplayKDError(f"student {built} cannot take the recipe's {view_size} px views: {exn}") from exn
    two_heads = hasattr(model, "set_distilled_training")
    if two_heads:
        model.set_distilled_training(True)
    model.train()
    return Student(model, built, {k: v for k, v in kwargs.items() if k != "drop_path_rate"}, two_heads)


def _check_patches(model: nn.Module, view_size: int) -> None:
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return
    for side, p in zip((view_size, view_size), patch):
        if side % p:
            raise ReplayKDError(f"--patch-size {p} does not divide the {view_size} px views: the last {side % p} px "
                                "of every row and column would be dropped")
