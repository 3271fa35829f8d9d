"""train-teacher learns the recipe's mixed, label-smoothed targets (soft-target CE), not the raw labels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replaykd.engine import train_one_epoch
from replaykd.export import Preprocessing
from replaykd.losses import DistillationLoss
from replaykd.manifest import Manifest
from replaykd.models import create_classifier
from replaykd.recipe import Recipe
from replaykd.teacher import Teacher
from replaykd.stages.options import TrainTeacherOptions
from replaykd.stages.train_teacher import view_loader

pytestmark = pytest.mark.slow


def test_one_epoch_with_a_mixing_recipe_trains_on_the_mixed_targets(digits_dir):
    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    assert recipe.mixes and recipe.smoothing > 0
    o = TrainTeacherOptions.from_mapping({"data": digits_dir, "recipe": "digits-ra", "batch_size": 128, "workers": 0})
    batches = list(view_loader(m, recipe, o, torch.device("cpu")))
    used = []

    class Recording(DistillationLoss):
        def forward(self, outputs, target, teacher=None):
            used.append(target.clone())
            return super().forward(outputs, target, teacher)

    torch.manual_seed(0)
    prep = Preprocessing(recipe.mean, recipe.std, 32, "bicubic")
    net = Teacher(create_classifier("regnety_002", m.num_classes), prep, recipe.mean, recipe.std)
    stats, steps = train_one_epoch(net, Recording("none"), batches, torch.optim.AdamW(net.parameters()), torch.device("cpu"),
                                   0, lambda s: 1e-3, 0, show_progress=False)
    assert steps == len(batches) and stats.images == sum(len(b) for b in batches) > m.count("train") - 2 * 128
    assert all(len(b) == 128 for b in batches)  # full batches only, as DeiT
    mixed = 0
    for batch, target in zip((b.views for b in batches), used):
        assert batch.teacher is None
        smooth = recipe.smoothing
        own = F.one_hot(batch.labels, 10).float() * (1 - smooth) + smooth / 10
        other = F.one_hot(batch.partner_labels, 10).float() * (1 - smooth) + smooth / 10
        lam = batch.lams.float().unsqueeze(1)
        assert torch.allclose(target, lam * own + (1 - lam) * other, atol=1e-6)
        mixed += int(((batch.lams < 1) & (batch.labels != batch.partner_labels)).sum())
    assert mixed > 0.5 * m.count("train")  # most views carry two labels
