"""The token-selection training loss of the reference code (DynamicViT's `DistillDiffPruningLoss`, token
distillation removed): cross-entropy + ratio_weight * keep-ratio MSE / #selectors + distill_weight * KL to the
frozen dense teacher."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spkprune.models.selector import selectors_of

RATIO_WEIGHT = 2.0
DISTILL_WEIGHT = 0.5


def keep_ratio_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over learned selectors of mean over images of (kept fraction - target)^2, divided by the number of
    selectors (the reference code divides by `len(pruning_loc)`); None when no selector has weights (the term
    would be a constant)."""
    selectors = selectors_of(model)
    terms = [
        ((s.last_decision.mean(1) - s.keep_ratio) ** 2).mean()
        for s in selectors.values()
        if s.has_weights and s.last_decision is not None and s.last_decision.requires_grad
    ]
    return torch.stack(terms).sum() / len(selectors) if terms else None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True, batchmean)`, as the reference code:
    the KL divergence from the teacher's distribution to the student's, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


@dataclass
class SelectionLoss:
    """`fit`'s `loss_fn(model, images, targets, logits)`. `targets` are class indices or (under mixup) soft targets.

    `last` keeps the three terms of the last call (floats) for logging and tests.
    """

    teacher: nn.Module | None = None
    label_smoothing: float = 0.1
    ratio_weight: float = RATIO_WEIGHT
    distill_weight: float = DISTILL_WEIGHT
    last: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)

    def classification(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor):
        loss = self.classification(logits, targets)
        self.last = {"ce": float(loss.detach()), "ratio": 0.0, "distill": 0.0}
        ratio = keep_ratio_loss(model)
        if ratio is not None and self.ratio_weight:
            loss = loss + self.ratio_weight * ratio
            self.last["ratio"] = float(ratio.detach())
        if self.teacher is not None and self.distill_weight:
            teacher_logits = self._teacher_logits(images)
            kl = distillation_loss(logits, teacher_logits)
            loss = loss + self.distill_weight * kl
            self.last["distill"] = float(kl.detach())
        return loss

    @torch.no_grad()
    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.teacher.parameters(), None)
        if param is not None and param.device != images.device:
            self.teacher.to(images.device)
        self.teacher.eval()
        return self.teacher(images)
