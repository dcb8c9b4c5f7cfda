"""What a model does on data: input firing rates, exact accumulate counts and tokens kept, from forward hooks.

For every weight layer the exact number of accumulates is the sum, over input elements, of the element's value times
its nonzero fan-out (how many nonzero weights it reaches). A spike costs one AC per nonzero weight it reaches and an
integer input k (the residual stream is a sum of spike maps) costs k, as COUNTING.md asks. For a 3x3 conv the fan-out
depends on the position (padding), so it is computed by one convolution with the out-channel-summed nonzero pattern.
Only kept tokens count: gathered selectors shrink the tensors, masked ones pass a keep mask that is applied here.

Attention (each family's, `spkprune.counting.attention`): the SSA products from the q/k/v spikes (the coincident 1s of
Q.K^T, nnz(V) * n); the linear attentions from the sum entering their neuron (the SDT's `talking_heads_lif`, QKFormer's
token-attention `attn_lif`): every spike that survives the mask is added once. Tokens per block are read where each
attention's q neuron fires (and from the keep mask its block receives), in every family's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from spkprune.counting.attention import AttentionKind, attention_modules
from spkprune.counting.structure import WEIGHT_LAYERS, Structure, owner_of
from spkprune.errors import SpkpruneError


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
    attention: dict[str, float] = field(default_factory=dict)  # attention row (`block.0.attn.qk`, ...) -> ACs
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


def _read_positions(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input positions a 1x1 conv reads: every one, or every s-th with stride s (QKFormer's downsampling
    shortcuts `proj_res_conv` are 1x1 with stride 2), so that its rate and ACs are those of what it reads."""
    if isinstance(module, nn.Linear) or not _is_pointwise(module) or all(s == 1 for s in module.stride):
        return x
    if any(p != 0 for p in module.padding):
        raise ValueError(f"a padded 1x1 convolution is not counted: {module}")
    return x[(..., *(slice(None, None, s) for s in module.stride))]


class _Recorder:
    """Forward hooks that fill an `Activity`; `close()` removes them."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None):
        attentions = attention_modules(model)
        self.blocks = [path.rsplit(".", 1)[0] for path, _, _ in attentions]
        depth = len(self.blocks)
        self.activity = Activity(layers={}, tokens_sum=[0.0] * depth, tokens_sq_sum=[0.0] * depth)
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
        for index, (path, attention, kind) in enumerate(attentions):
            block = model.get_submodule(self.blocks[index])
            self.handles.append(block.register_forward_pre_hook(self._on_block, with_kwargs=True))
            self._hook_attention(index, path, attention, kind)

    @staticmethod
    def _fan_out(module: nn.Module, mask: torch.Tensor | None) -> torch.Tensor:
        nonzero = (effective_weight(module.weight.detach(), mask) != 0).float()
        if _is_pointwise(module):
            return nonzero.flatten(2).sum(dim=(0, 2)) if nonzero.dim() > 2 else nonzero.sum(0)  # [C_in]
        return nonzero.sum(0, keepdim=True)  # [1, C_in, kh, kw]

    def _on_block(self, _module, args, kwargs):
        """The keep mask `[B, N]` a block receives (masked selectors), and the time steps of its input."""
        self.keep = args[1] if len(args) > 1 else kwargs.get("keep")
        self.steps = args[0].shape[0]

    def _kept_rows(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Input rows `[K, C_in]` of a pointwise layer, restricted to kept tokens inside blocks."""
        rows = _channels_last_rows(module, x)
        keep = self.keep
        if keep is not None and owner_of(name, self.blocks) is not None and rows.shape[1] == keep.shape[1]:
            rows = rows.reshape(self.steps, -1, *rows.shape[1:])[:, keep.bool()]
        return rows.reshape(-1, rows.shape[-1])

    def _on_layer(self, name: str, fan: torch.Tensor):
        def hook(module, inputs, _out):
            x = _read_positions(module, inputs[0].detach())
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

    # ---- attention ---------------------------------------------------------------------------------------------
    def _hook_attention(self, index: int, path: str, attention: nn.Module, kind: AttentionKind) -> None:
        for neuron in kind.spikes:
            lif = attention.get_submodule(neuron)
            self.handles.append(lif.register_forward_hook(self._on_spikes(index, path, kind, neuron[0])))
        if kind.summed is not None:  # the linear attentions: ACs are what enters the neuron after the addition
            row = next(r for r in kind.rows if r.op == "ac")
            lif = attention.get_submodule(kind.summed)
            hook = self._on_summed(f"{path}.{row.suffix}", kind.summed_per_token)
            self.handles.append(lif.register_forward_pre_hook(hook))

    def _token_weight(self, like: torch.Tensor) -> torch.Tensor | None:
        """The keep mask as weights broadcastable against `like` `[T, B, N, C]`, or None."""
        if self.keep is None:
            return None
        return self.keep.to(like.dtype).view(1, *self.keep.shape, 1)

    def _on_spikes(self, index: int, path: str, kind: AttentionKind, part: str):
        def hook(_module, _inputs, out):
            tokens = kind.to_tokens(out.detach())  # [T, B, N, C]
            if part == "q":  # once per block call: the tokens it works on
                B, N = tokens.shape[1], tokens.shape[2]
                kept = self.keep.sum(1).double() if self.keep is not None else torch.full((B,), float(N))
                self.activity.tokens_sum[index] += float(kept.sum())
                self.activity.tokens_sq_sum[index] += float((kept**2).sum())
            if kind.name == "ssa":
                self.spikes[part] = tokens
                if part == "v":
                    self._count_ssa(path)

        return hook

    def _on_summed(self, row: str, per_token: bool):
        """Every spike that survives the mask is added once: the ACs are the sum of what enters the neuron (over kept
        tokens where the tokens are still an axis, `per_token`: QKFormer's per-token sums `[T, B, heads, 1, N]`; the
        SDT's sum runs over the tokens, so a masked token must already be out of `k * v`, as the model keeps it)."""

        def hook(_module, args):
            summed = args[0].detach().double()
            keep = self.keep
            if per_token and keep is not None and summed.shape[-1] == keep.shape[1]:
                summed = summed * keep.to(summed.dtype).view(1, keep.shape[0], *([1] * (summed.dim() - 3)), -1)
            self.activity.attention[row] = self.activity.attention.get(row, 0.0) + float(summed.sum())

        return hook

    def _count_ssa(self, path: str) -> None:
        q, k, v = (self.spikes.pop(p) for p in ("q", "k", "v"))  # [T, B, N, C]
        B, N = q.shape[1], q.shape[2]
        weight = self._token_weight(q)
        if weight is None:
            weight = torch.ones(1, B, N, 1, dtype=q.dtype, device=q.device)
            kept = torch.full((B,), float(N), device=q.device)
        else:
            kept = self.keep.sum(1).to(q.dtype)
        # sum over heads and pairs (i, j) of q_i . k_j = sum over channels of (sum_i q) (sum_j k)
        coincidences = ((q * weight).sum(2).double() * (k * weight).sum(2).double()).sum()
        # each nonzero v_j is added into the n kept output rows
        value_reads = (((v * weight) != 0).sum(dim=(2, 3)).double() * kept.double().view(1, B)).sum()
        for suffix, count in (("qk", coincidences), ("av", value_reads)):
            name = f"{path}.{suffix}"
            self.activity.attention[name] = self.activity.attention.get(name, 0.0) + float(count)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def measure_activity(
    model: nn.Module,
    batches: Iterable,
    masks: Mapping[str, torch.Tensor] | None = None,
    structure: Structure | None = None,
) -> Activity:
    """Run `model` (eval, no grad) on `batches` (input tensors or `(inputs, targets)` pairs) and collect activity.

    `masks` are the pruning masks of the model's weights; the weights themselves are expected to be masked already
    (spkprune's training keeps them at zero), the masks only make the fan-out exact if they are not. `structure`
    (optional) is only checked against the blocks found here.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    recorder = _Recorder(model, masks)
    if structure is not None and structure.blocks and recorder.blocks != structure.blocks:
        recorder.close()
        raise SpkpruneError(f"blocks {recorder.blocks} differ from the traced structure's {structure.blocks}")
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
