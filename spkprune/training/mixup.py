"""Batch-mode mixup with label smoothing (timm's `Mixup` with cutmix off), drawing from torch's generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return torch.full((len(targets), num_classes), off, device=targets.device).scatter_(1, targets[:, None], on)


class Mixup:
    """Mixes each batch with its reverse (`x * lam + x.flip(0) * (1 - lam)`, lam ~ Beta(alpha, alpha)) with
    probability `prob`; returns soft targets (smoothed one-hot, mixed with the same lam)."""

    def __init__(self, alpha: float, prob: float, smoothing: float, num_classes: int):
        self.alpha, self.prob, self.smoothing, self.num_classes = alpha, prob, smoothing, num_classes

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = 1.0
        if self.alpha > 0 and float(torch.rand(())) < self.prob:
            lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        soft = smooth_one_hot(targets, self.num_classes, self.smoothing)
        if lam == 1.0:
            return images, soft
        mixed = images * lam + images.flip(0) * (1.0 - lam)
        return mixed, soft * lam + soft.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
