"""DeiT's distillation loss fed by sparse top-k teacher targets (labels only with `none`: plain training)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from replaykd.records import TeacherEnsemble, TeacherTargets


@dataclass
class LossParts:
    """The loss to minimise and its two terms (for the log)."""

    loss: torch.Tensor
    base: torch.Tensor
    distill: torch.Tensor


def dense_target(probs: torch.Tensor, classes: torch.Tensor, num_classes: int, tau: float = 1.0) -> torch.Tensor:
    """Sparse top-k -> dense: the k probabilities, the remaining mass spread evenly over the other classes
    (TinyViT). For tau != 1 the dense target is tempered, q ∝ p^(1/tau), as softmax(logits / tau) would be."""
    probs = probs.float()
    k = probs.shape[-1]
    rest = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0)
    fill = rest / max(1, num_classes - k)
    dense = fill.expand(-1, num_classes).clone().scatter_(1, classes.long(), probs)
    return temper(dense, tau)


def temper(dense: torch.Tensor, tau: float) -> torch.Tensor:
    """A dense distribution at temperature `tau`, q ∝ p^(1/tau), as softmax(logits / tau) would be (tau 1: as it
    is)."""
    if tau == 1.0:
        return dense
    dense = dense.clamp_min(1e-12).pow(1.0 / tau)
    return dense / dense.sum(-1, keepdim=True)


def ensemble_dense(teacher: TeacherEnsemble, num_classes: int) -> torch.Tensor:
    """The weighted mean of the members' distributions, each made dense from its own top-k as one teacher's is,
    summed in the members' order (the cached and the online ensemble add the same numbers the same way)."""
    mean = None
    for member, weight in zip(teacher.members, teacher.weights):
        part = weight * dense_target(member.probs, member.classes, num_classes)
        mean = part if mean is None else mean + part
    return mean


def top_class(dense: torch.Tensor) -> torch.Tensor:
    """Each row's arg-max; among equal maxima the lowest class index, on every device and in every path (the
    ensemble's hard target: its members' top-k rows can tie exactly, being float16)."""
    best = dense.max(-1, keepdim=True).values
    index = torch.arange(dense.shape[-1], device=dense.device).expand_as(dense)
    return torch.where(dense == best, index, dense.shape[-1]).amin(-1)


def soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against dense (mixed, smoothed) targets, as timm's SoftTargetCrossEntropy."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def hard_distillation(logits: torch.Tensor, teacher: TeacherTargets | TeacherEnsemble,
                      num_classes: int) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy to the teacher's top-1 class (an ensemble's: the arg-max of its
    weighted mean, `top_class`)."""
    if isinstance(teacher, TeacherEnsemble):
        top = top_class(ensemble_dense(teacher, num_classes))
    else:
        top = teacher.classes[:, 0]
    return F.cross_entropy(logits.float(), top.long())


def teacher_distribution(teacher: TeacherTargets | TeacherEnsemble, num_classes: int,
                         tau: float = 1.0) -> torch.Tensor:
    """The teacher's dense distribution over the classes at temperature `tau`, from its top-k (an ensemble's: the
    weighted mean of its members')."""
    if isinstance(teacher, TeacherEnsemble):
        return temper(ensemble_dense(teacher, num_classes), tau)
    return dense_target(teacher.probs, teacher.classes, num_classes, tau)


def soft_distillation(logits: torch.Tensor, teacher: TeacherTargets | TeacherEnsemble, num_classes: int,
                      tau: float = 1.0, scale: str = "deit") -> torch.Tensor:
    """Soft distillation: KL(dense teacher at `tau` || softmax(logits / tau)) * tau^2, summed over the batch and the
    classes and divided by batch * classes with `scale` 'deit' (DeiT's losses.py), or by the batch only with
    'batchmean' (timm's distillation tasks)."""
    q = teacher_distribution(teacher, num_classes, tau)
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    divisor = log_p.numel() if scale == "deit" else log_p.shape[0]
    return F.kl_div(log_p, q, reduction="sum") * (tau ** 2) / divisor


class DistillationLoss(nn.Module):
    """(1 - alpha) * CE(base, mixed labels) + alpha * KD(kd head, teacher), as DeiT's losses.py and timm's logit
    distillation.

    A distilled DeiT gives (cls, dist) logits: the class head learns the labels, the distillation head the teacher.
    Any other student gives one tensor of logits, which learns both. hard: `hard_distillation`; soft:
    `soft_distillation` at `tau`, scaled as `soft_scale` says; none: labels only (both heads of a two-headed
    student).
    """

    def __init__(self, mode: str = "hard", alpha: float = 0.5, tau: float = 1.0, num_classes: int = 1000,
                 soft_scale: str = "deit"):
        super().__init__()
        mode, soft_scale = getattr(mode, "value", mode), getattr(soft_scale, "value", soft_scale)
        if mode not in ("hard", "soft", "none"):
            raise ValueError(f"distillation must be hard, soft or none, got {mode!r}")
        if soft_scale not in ("deit", "batchmean"):
            raise ValueError(f"soft_scale must be deit or batchmean, got {soft_scale!r}")
        self.mode, self.alpha, self.tau, self.num_classes = mode, alpha, tau, num_classes
        self.soft_scale = soft_scale

    def forward(self, outputs, target: torch.Tensor,
                teacher: TeacherTargets | TeacherEnsemble | None = None) -> LossParts:
        """Loss parts for the student's logits: (cls, dist) for a distilled DeiT, else one tensor. An ensemble's
        hard target is its mean's arg-max (`top_class`), its soft target the mean itself."""
        base_logits, kd_logits = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base = soft_target_ce(base_logits, target)
        if self.mode == "none":
            if kd_logits is base_logits:
                return LossParts(base, base, torch.zeros((), device=base.device))
            distill = soft_target_ce(kd_logits, target)
            return LossParts(0.5 * (base + distill), base, distill)
        if self.mode == "hard":
            distill = hard_distillation(kd_logits, teacher, self.num_classes)
        else:
            distill = soft_distillation(kd_logits, teacher, self.num_classes, self.tau, self.soft_scale)
        return LossParts((1 - self.alpha) * base + self.alpha * distill, base, distill)
