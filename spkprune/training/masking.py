"""Keep pruned weights exactly zero while training.

Zeroing a weight once is not enough: AdamW's moments or SGD's momentum buffer would regrow it at the next step.
`MaskEnforcer` masks the gradient before the step, and after the step zeroes the weight and every optimiser state
tensor of the weight's shape (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer, ...) at the pruned entries.
"""

from __future__ import annotations

import torch
from torch import nn

from spkprune.checkpoint import mask_mismatch
from spkprune.errors import SpkpruneError
from spkprune.training.distributed import unwrap


class MaskEnforcer:
    """`masks` maps parameter names (state_dict keys) to bool tensors; True = kept, False = pruned."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, masks: dict[str, torch.Tensor]):
        params = dict(unwrap(model).named_parameters())
        self.optimizer = optimizer
        problem = mask_mismatch(masks, params)
        if problem:
            raise SpkpruneError(problem)
        # Each parameter with its pruned entries (True = pruned), inverted once instead of on every call.
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        for name, mask in masks.items():
            param = params[name]
            self.pairs.append((param, ~mask.to(device=param.device, dtype=torch.bool)))

    def __bool__(self) -> bool:
        return bool(self.pairs)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for param, pruned in self.pairs:
            if param.grad is not None:
                param.grad.masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights and their optimiser state (call after every optimiser step)."""
        for param, pruned in self.pairs:
            param.masked_fill_(pruned, 0.0)
            state = self.optimizer.state.get(param, {}) if self.optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(pruned, 0)
