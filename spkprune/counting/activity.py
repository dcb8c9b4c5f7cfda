"""What a model does on data: input firing rates, exact accumulate counts and tokens kept, from forward hooks.

For every weight layer the exact number of accumulates is the sum, over input elements, of the element's value times
its nonzero fan-out (how many nonzero weights it reaches). A spike costs one AC per nonzero weight it reaches and an
integer input k (the residual stream is a sum of spike maps) costs k, as COUNTING.md asks. For a 3x3 conv the fan-out
depends on the position (padding), so it is computed by one convolution with the out-channel-summed nonzero pattern.
Only kept tokens count: gathered selectors shrink the tensors, masked ones pass a keep mask that is applied here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from spkprune.counting.structure import WEIGHT_LAYERS, scope_of
from spkprune.models.spikformer import Block


@dataclass
class LayerActivity:
    input_sum: float = 0.0  # sum of the input values over kept positions
    input_count: int = 0  # input elements over kept positions
    acs: float = 0.0  # exact ACs: sum of value x nonzero fan-out
    integer: bool = True  # every input value seen was a non-negative integer (spikes or spike counts)

    @property
    def firing_rate(self) -> float | None:
        return self.input_sum / self.input_count if self.input_count else None


@dataclass
class Activity:
    """Sums over `images` images; divide by `images` for per-image figures."""

    images: int = 0
    layers: dict[str, LayerActivity] = field(default_factory=dict)
    attention: dict[int, list[float]] = field(default_factory=dict)  # block -> [Q.K^T ACs, (QK^T).V ACs]
    tokens_sum: list[float] = field(default_factory=list)  # per block: sum over images of tokens kept
    tokens_sq_sum: list[float] = field(default_factory=list)  # per block: sum over images of tokens kept squared

    def mean_tokens(self, block: int) -> float:
        return self.tokens_sum[block] / self.images

    def mean_tokens_sq(self, block: int) -> float:
        return self.tokens_sq_sum[block] / self.images


def effective_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return weight if mask is None else weight * mask.to(weight.device, weight.dtype)


def _channels_last_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 layer's input as `[calls, positions, C_in]` (Linear is already channels-last)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1]) if x.dim() < 3 else x.reshape(-1, x.shape[-2], x.shape[-1])
    return x.flatten(2).transpose(1, 2)


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or all(k == 1 for k in module.kernel_size)


class _Recorder:
    """Forward hooks that fill an `Activity`; `close()` removes them."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None):
        self.activity = Activity(
            layers={}, tokens_sum=[0.0] * model.config.depth, tokens_sq_sum=[0.0] * model.config.depth
        )
        self.keep: torch.Tensor | None = None
        self.steps = 1
        self.spikes: dict[str, torch.Tensor] = {}
        self.handles = []
        masks = masks or {}
        for name, module in model.named_modules():
            if isinstance(module, WEIGHT_LAYERS):
                fan = self._fan_out(module, masks.get(f"{name}.weight"))
                self.activity.layers[name] = LayerActivity()
                self.handles.append(module.register_forward_hook(self._on_layer(name, fan)))
            elif isinstance(module, Block):
                index = int(name.split(".")[1])
                self.activity.attention[index] = [0.0, 0.0]
                self.handles.append(module.register_forward_pre_hook(self._on_block(index), with_kwargs=True))
                for part in ("q", "k", "v"):
                    lif = getattr(module.attn, f"{part}_lif")
                    self.handles.append(lif.register_forward_hook(self._on_qkv(index, part)))

    @staticmethod
    def _fan_out(module: nn.Module, mask: torch.Tensor | None) -> torch.Tensor:
        nonzero = (effective_weight(module.weight.detach(), mask) != 0).float()
        if _is_pointwise(module):
            return nonzero.flatten(2).sum(dim=(0, 2)) if nonzero.dim() > 2 else nonzero.sum(0)  # [C_in]
        return nonzero.sum(0, keepdim=True)  # [1, C_in, kh, kw]

    def _on_block(self, index: int):
        def hook(_module, args, kwargs):
            x = args[0]
            keep = args[1] if len(args) > 1 else kwargs.get("keep")
            self.keep, self.steps = keep, x.shape[0]
            kept = keep.sum(1).double() if keep is not None else torch.full((x.shape[1],), float(x.shape[2]))
            self.activity.tokens_sum[index] += float(kept.sum())
            self.activity.tokens_sq_sum[index] += float((kept**2).sum())

        return hook

    def _kept_rows(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Input rows `[K, C_in]` of a pointwise layer, restricted to kept tokens inside blocks."""
        rows = _channels_last_rows(module, x)
        if self.keep is not None and scope_of(name)[0].startswith("block."):
            T = self.steps
            rows = rows.reshape(T, -1, *rows.shape[1:])[:, self.keep.bool()]
        return rows.reshape(-1, rows.shape[-1])

    def _on_layer(self, name: str, fan: torch.Tensor):
        def hook(module, inputs, _out):
            x = inputs[0].detach()
            stats = self.activity.layers[name]
            if _is_pointwise(module):
                rows = self._kept_rows(name, module, x)
                stats.acs += float((rows.double().sum(0) * fan.to(rows.device, torch.float64)).sum())
            else:
                rows = x
                weight = fan.to(x.device, x.dtype)
                reached = F.conv2d(x, weight, None, module.stride, module.padding, module.dilation)
                stats.acs += float(reached.double().sum())
            stats.input_sum += float(rows.double().sum())
            stats.input_count += rows.numel()
            if stats.integer:
                stats.integer = bool(((rows >= 0) & (rows == rows.round())).all())

        return hook

    def _on_qkv(self, index: int, part: str):
        def hook(_module, _inputs, out):
            self.spikes[part] = out.detach()
            if part == "v":
                self._count_attention(index)

        return hook

    def _count_attention(self, index: int) -> None:
        q, k, v = (self.spikes.pop(p) for p in ("q", "k", "v"))  # [T, B, N, C]
        B, N = q.shape[1], q.shape[2]
        if self.keep is None:
            weight = torch.ones(1, B, N, 1, dtype=q.dtype, device=q.device)
            kept = torch.full((B,), float(N), device=q.device)
        else:
            weight = self.keep.to(q.dtype).view(1, B, N, 1)
            kept = self.keep.sum(1).to(q.dtype)
        # sum over heads and pairs (i, j) of q_i . k_j = sum over channels of (sum_i q) (sum_j k)
        coincidences = ((q * weight).sum(2).double() * (k * weight).sum(2).double()).sum()
        # each nonzero v_j is added into the n kept output rows
        value_reads = (((v * weight) != 0).sum(dim=(2, 3)).double() * kept.double().view(1, B)).sum()
        totals = self.activity.attention[index]
        totals[0] += float(coincidences)
        totals[1] += float(value_reads)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def measure_activity(
    model: nn.Module,
    batches: Iterable,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> Activity:
    """Run `model` (eval, no grad) on `batches` (input tensors or `(inputs, targets)` pairs) and collect activity.

    `masks` are the pruning masks of the model's weights; the weights themselves are expected to be masked already
    (spkprune's training keeps them at zero), the masks only make the fan-out exact if they are not.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    recorder = _Recorder(model, masks)
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device))
                recorder.activity.images += images.shape[0]
    finally:
        recorder.close()
        model.train(was_training)
    return recorder.activity
