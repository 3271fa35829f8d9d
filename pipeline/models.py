"""What teachers and students share: timm models by name, weights read from local files, a file's identity."""
from __future__ import annotations

import hashlib
from pathlib import Path

import timm
from torch import nn

from replaykd.errors import ReplayKDError


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (a weights file's identity)."""
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


def load_weights(model: nn.Module, state: dict, checkpoint: Path, name: str) -> None:
    """Load `state` (read from `checkpoint`) strictly into `model` (timm's `name`); a misfit is an error listing the
    keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"
        raise ReplayKDError(
            f"checkpoint {checkpoint} does not fit {name}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; wrong shapes: "
            + (", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]) or "none"))
    model.load_state_dict(state, strict=True)


def check_model_name(name: str) -> None:
    """Refuse a name timm does not know, listing near names, or a tag its architecture does not have, listing its
    tags."""
    if name.startswith("hf-hub:"):
        return
    if timm.is_model(name):
        base, tag = timm.models.split_model_name_tag(name)
        tagged = timm.models.get_arch_pretrained_cfgs(base)
        if tag and name not in tagged:
            raise ReplayKDError(f"timm model {base} has no tag {tag!r} (it has: {', '.join(tagged) or 'none'}); name "
                                "one of these")
        return
    near = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
    raise ReplayKDError(f"unknown timm model {name!r}; similar: {', '.join(near) or 'none'}")


def create_classifier(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A timm model by name, randomly initialised (no download), with an error listing near names."""
    check_model_name(name)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def classifier_rows(model: nn.Module, state: dict) -> int | None:
    """How many classes the weights in `state` were trained for (rows of the model's classifier), if it says."""
    heads = model.pretrained_cfg.get("classifier")
    for head in (heads,) if isinstance(heads, str) else heads or ():
        weight = state.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None
