"""replaykd: offline knowledge distillation. A teacher's top-k targets cached once for replayed augmented views
(stage one), and students trained on the identical views from that cache (stage two), by `replaykd train-student`
or by a training loop of your own through `ReplayLoader`.

The names below load on first use (`import replaykd` alone imports neither torch nor timm, so the command line's
`--help` and `cache info` stay quick); the modules beside them are the library the commands are built from.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "ReplayLoader": "replaykd.replay_loader",
    "TrainBatch": "replaykd.records",
    "ViewBatch": "replaykd.records",
    "TeacherTargets": "replaykd.records",
    "TeacherEnsemble": "replaykd.records",
    "TeacherRecord": "replaykd.records",
    "DistillationLoss": "replaykd.losses",
    "LossParts": "replaykd.losses",
    "hard_distillation": "replaykd.losses",
    "soft_distillation": "replaykd.losses",
    "soft_target_ce": "replaykd.losses",
    "dense_target": "replaykd.losses",
    "teacher_distribution": "replaykd.losses",
    "drawing_from": "replaykd.rng",
    "own_drop_path": "replaykd.rng",
    "rank_generator": "replaykd.rng",
    "TargetSource": "replaykd.targets",
    "OnlineTargets": "replaykd.targets",
    "TeacherCache": "replaykd.cache",
    "Manifest": "replaykd.manifest",
    "Recipe": "replaykd.recipe",
    "ReplayKDError": "replaykd.errors",
}
__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:
    from replaykd.cache import TeacherCache
    from replaykd.errors import ReplayKDError
    from replaykd.losses import (
        DistillationLoss,
        LossParts,
        dense_target,
        hard_distillation,
        soft_distillation,
        soft_target_ce,
        teacher_distribution,
    )
    from replaykd.manifest import Manifest
    from replaykd.recipe import Recipe
    from replaykd.records import TeacherEnsemble, TeacherRecord, TeacherTargets, TrainBatch, ViewBatch
    from replaykd.replay_loader import ReplayLoader
    from replaykd.rng import drawing_from, own_drop_path, rank_generator
    from replaykd.targets import OnlineTargets, TargetSource


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'replaykd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
