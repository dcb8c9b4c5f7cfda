"""Per-iteration learning-rate schedule: linear warm-up, then cosine decay, then a floor (timm's cosine scheduler
evaluated at every iteration instead of every epoch)."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Sets the learning rate of every parameter group before each optimiser step.

    `offset` starts the schedule at iteration `offset` (late rewinding: the retrained weights continue the dense
    run's schedule from the rewind point). The cosine reaches `min_lr` at `offset + decay_iters`, and stays there.
    As in timm (no warm-up prefix), the cosine is measured from iteration 0 and warm-up overrides its start.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        lr: float,
        min_lr: float,
        warmup_lr: float,
        warmup_iters: int,
        decay_iters: int,
        offset: int = 0,
    ):
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.warmup_iters = warmup_iters
        self.total_iters = offset + decay_iters
        self.step_count = offset

    def lr_at(self, step: int) -> float:
        if step < self.warmup_iters:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_iters
        if step >= self.total_iters:
            return self.min_lr
        progress = step / self.total_iters
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self) -> float:
        """Set the learning rate for the coming step and return it."""
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def step(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_iters": self.total_iters, "warmup_iters": self.warmup_iters}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.total_iters = int(state["total_iters"])
        self.warmup_iters = int(state["warmup_iters"])
