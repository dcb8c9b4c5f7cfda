"""What a masked Spikformer provably never uses: attention heads, MLP hidden channels and inner stem channels.

A structure is removable when removing it changes no output of the model in eval mode:

- **unread**: every weight that reads it is zero (the projection columns of a head, the fc2 column of an MLP
  channel, the next convolution's input channel of a stem channel). Whatever its neurons fire is multiplied by zero.
- **silent**: every weight that feeds its neurons is zero and they provably never fire. With zero weights a neuron's
  input is a constant, the layer bias passed through BatchNorm's running statistics, and a LIF neuron charged by a
  constant c from 0 climbs toward c without passing it (H = V + (c - V) / tau rounded to nearest stays <= c), so it
  fires at some time step only if c reaches the threshold. The constant is computed in float64 and must stay below
  the threshold by a margin larger than float32 rounding of the BatchNorm could move it; such a neuron never fires
  at any number of time steps. A head is silent when all its q, all its k or all its v neurons are (its attention
  product is then zero, which its attention neuron never fires on); a silent stem channel stays 0 through max-pooling.

Removing a silent stem channel can leave a channel of the next stage without input: the stem is checked again until
nothing changes. One head, one MLP channel and one channel per stem stage always stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spkprune.models.presets import SpikformerConfig

KINDS = {"heads": "attention heads", "mlp": "MLP hidden channels", "stem": "patch-splitting channels"}
STEM_SUFFIXES = ("", "1", "2", "3")
MARGIN = 1e-5  # relative to the size of the BatchNorm terms: far above float32 rounding (about 6e-8 per step)


@dataclass
class Plan:
    """The structures that stay: kept head indices and MLP channels per block, kept channels per stem stage."""

    heads: list[list[int]]
    mlp: list[list[int]]
    stem: list[list[int]]

    def widths(self, config: SpikformerConfig) -> SpikformerConfig:
        """`config` with the kept widths recorded per block and per stem stage."""
        return config.__class__.from_dict({
            **config.to_dict(),
            "block_heads": [len(kept) for kept in self.heads],
            "block_mlp_hidden": [len(kept) for kept in self.mlp],
            "stem_channels": [len(kept) for kept in self.stem],
        })

    def removed(self, config: SpikformerConfig) -> dict[str, dict[str, list[int]]]:
        """The removed indices per kind and place: {"heads": {"block.0": [1, 3]}, "stem": {"proj_conv1": [...]}}."""
        before = {
            "heads": [config.heads_of(b) for b in range(config.depth)],
            "mlp": [config.mlp_hidden_of(b) for b in range(config.depth)],
            "stem": list(config.stem_widths),
        }
        out: dict[str, dict[str, list[int]]] = {}
        for kind in KINDS:
            for place, (kept, width) in enumerate(zip(getattr(self, kind), before[kind])):
                gone = sorted(set(range(width)) - set(kept))
                if gone:
                    label = f"patch_embed.proj_conv{STEM_SUFFIXES[place]}" if kind == "stem" else f"block.{place}"
                    out.setdefault(kind, {})[label] = gone
        return out


def silent_channels(layer: nn.Module, bn: nn.Module, lif: nn.Module, without_input: torch.Tensor) -> torch.Tensor:
    """Bool per output channel of `layer -> bn -> lif`: no input (`without_input`) and a constant that never fires."""
    channels = bn.running_mean.shape[0]
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(channels, dtype=torch.float64)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shifted = (bias - bn.running_mean.detach().double()) * scale
    shift = bn.bias.detach().double()
    constant = shifted + shift
    slack = MARGIN * (1.0 + shifted.abs() + shift.abs())
    return without_input & (constant + slack < float(lif.v_threshold))


def _matrix(layer: nn.Module) -> torch.Tensor:
    """A Linear or 1x1 convolution's weight as `[out, in]`."""
    weight = layer.weight.detach()
    return weight.reshape(weight.shape[0], weight.shape[1], -1).flatten(1) if weight.dim() > 2 else weight


def _kept(removable: torch.Tensor, among: list[int] | None = None) -> list[int]:
    """Indices not `removable` (restricted to `among`); the first candidate when nothing would stay."""
    candidates = range(len(removable)) if among is None else among
    kept = [i for i in candidates if not removable[i]]
    return kept or list(candidates)[:1]


def _heads(attn: nn.Module) -> list[int]:
    heads, width = attn.num_heads, attn.head_dim
    unread = (_matrix(attn.weight_layer("proj")) == 0).all(0).view(heads, width).all(1)
    silent = torch.zeros(heads, dtype=torch.bool)
    for prefix in ("q", "k", "v"):
        layer = attn.weight_layer(prefix)
        quiet = silent_channels(layer, getattr(attn, f"{prefix}_bn"), getattr(attn, f"{prefix}_lif"),
                                (_matrix(layer) == 0).all(1))
        silent |= quiet.view(heads, width).all(1)
    return _kept(unread | silent)


def _mlp(mlp: nn.Module) -> list[int]:
    fc1 = mlp.weight_layer("fc1")
    silent = silent_channels(fc1, mlp.fc1_bn, mlp.fc1_lif, (_matrix(fc1) == 0).all(1))
    unread = (_matrix(mlp.weight_layer("fc2")) == 0).all(0)
    return _kept(unread | silent)


def _stem_stage(sps: nn.Module, stage: int, inputs: list[int], readers: list[int], among: list[int]) -> list[int]:
    """Kept channels of stem stage `stage`, given the kept input channels and the kept rows of the next conv."""
    conv = getattr(sps, f"proj_conv{STEM_SUFFIXES[stage]}")
    reader = getattr(sps, f"proj_conv{STEM_SUFFIXES[stage + 1]}")
    without_input = (conv.weight.detach()[:, inputs].flatten(1) == 0).all(1)
    silent = silent_channels(conv, getattr(sps, f"proj_bn{STEM_SUFFIXES[stage]}"),
                             getattr(sps, f"proj_lif{STEM_SUFFIXES[stage]}"), without_input)
    unread = (reader.weight.detach()[readers] == 0).transpose(0, 1).flatten(1).all(1)
    return _kept(unread | silent, among)


def _stem(sps: nn.Module) -> list[list[int]]:
    """Kept channels of the three inner stem stages, checked again until removing some frees no other."""
    convs = [getattr(sps, f"proj_conv{s}") for s in STEM_SUFFIXES]
    kept = [list(range(conv.out_channels)) for conv in convs[:3]]
    images, embedding = list(range(convs[0].in_channels)), list(range(convs[3].out_channels))
    changed = True
    while changed:
        changed = False
        for stage in range(3):
            inputs = images if stage == 0 else kept[stage - 1]
            readers = embedding if stage == 2 else kept[stage + 1]
            still = _stem_stage(sps, stage, inputs, readers, kept[stage])
            changed |= still != kept[stage]
            kept[stage] = still
    return kept


def plan_compaction(model: nn.Module) -> Plan:
    """What `model` (weights already masked, BatchNorm running statistics as in eval) can lose exactly."""
    heads = [_heads(block.attn) for block in model.block]
    mlp = [_mlp(block.mlp) for block in model.block]
    return Plan(heads, mlp, _stem(model.patch_embed))
