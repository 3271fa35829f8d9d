"""DistillationLoss against DeiT's losses.py (facebookresearch/deit) written out, from the teacher's full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from replaykd.losses import DistillationLoss
from replaykd.records import TeacherTargets

B, C = 16, 10


def deit_loss(outputs, outputs_kd, teacher_outputs, target, mode: str, alpha: float, tau: float) -> torch.Tensor:
    """DeiT's DistillationLoss.forward, with its base criterion under mixup (timm's SoftTargetCrossEntropy)."""
    base_loss = SoftTargetCrossEntropy()(outputs, target)
    if mode == "soft":
        T = tau
        distillation_loss = F.kl_div(F.log_softmax(outputs_kd / T, dim=1), F.log_softmax(teacher_outputs / T, dim=1),
                                     reduction="sum", log_target=True) * (T * T) / outputs_kd.numel()
    else:
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha


def full(teacher: torch.Tensor) -> TeacherTargets:
    """The teacher's whole softmax as top-k targets (k = C, kept in float32), so the dense target is exactly it."""
    probs, classes = teacher.softmax(-1).topk(C, dim=-1)
    return TeacherTargets(probs, classes)


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (torch.randn(B, C, generator=g) * 3 for _ in range(3))
    # a Mixup batch's targets: each row mixed with its mirror, label smoothing 0.1
    target = mixup_target(torch.randint(C, (B,), generator=g), C, lam=0.7, smoothing=0.1)
    return cls, dist, teacher, target


@pytest.mark.parametrize("alpha", [0.5, 0.2])
@pytest.mark.parametrize("mode,tau", [("hard", 1.0), ("soft", 1.0), ("soft", 3.0)])
@pytest.mark.parametrize("heads", ["cls-dist", "one-head"])
def test_distillation_loss_is_deits(logits, heads, mode, tau, alpha):
    cls, dist, teacher, target = logits
    # a one-head student is DeiT's loss with its one tensor as both outputs
    outputs, kd = ((cls, dist), dist) if heads == "cls-dist" else (cls, cls)
    got = DistillationLoss(mode, alpha, tau, C)(outputs, target, full(teacher))
    assert torch.allclose(got.loss, deit_loss(cls, kd, teacher, target, mode, alpha, tau), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.base, SoftTargetCrossEntropy()(cls, target), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_batchmean_is_deits_times_the_class_count(logits, tau):
    _, dist, teacher, target = logits
    deit = DistillationLoss("soft", 1.0, tau, C)(dist, target, full(teacher)).distill
    batchmean = DistillationLoss("soft", 1.0, tau, C, "batchmean")(dist, target, full(teacher)).distill
    assert torch.allclose(batchmean, deit * C, rtol=1e-5)
    # timm's distillation tasks' KD term
    timm_kd = F.kl_div(F.log_softmax(dist / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                       log_target=True) * tau ** 2
    assert torch.allclose(batchmean, timm_kd, rtol=1e-5, atol=1e-6)
