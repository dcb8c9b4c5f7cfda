"""What each family's attention costs, declared once per attention class (docs/counting.md, "Attention").

- `ssa` (Spikformer; QKFormer's last stage): Q.K^T and (Q.K^T).V, products of spike matrices, n^2 * D each;
- `sdsa` (the Spike-driven Transformer's `direct_xor` attention): `k * v` is a mask whose surviving spikes are added
  up over the tokens (`kv_sum`, n * D additions at most), then `q * SN(kv)` is a mask (`q_mask`, n * D, no addition);
- `qkta` (QKFormer's Q-K token attention): q is added up over each head's channels (`q_sum`, n * D additions at
  most), then the token attention vector masks k (`k_mask`, n * D, no addition).

The shapes come from the neurons' outputs in a traced forward (`AttentionSpec`), never from the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from spkprune.models.qkformer import SpikingSelfAttention as QKFormerSSA
from spkprune.models.qkformer import TokenQKAttention
from spkprune.models.sdt import SpikeDrivenSelfAttention
from spkprune.models.spikformer import SSA


def sequence_tokens(spikes: torch.Tensor) -> torch.Tensor:
    """Spikformer's neurons answer token lists `[T, B, N, C]` already."""
    return spikes


def map_tokens(spikes: torch.Tensor) -> torch.Tensor:
    """Maps `[T, B, C, H, W]` (SDT) or `[T, B, C, N]` (QKFormer) -> `[T, B, N, C]`: the positions are the tokens."""
    return spikes.flatten(3).transpose(2, 3)


@dataclass(frozen=True)
class AttentionRow:
    """One spike x spike row of an attention: `suffix` (the row is `<attention path>.<suffix>`), how its dense count
    grows with tokens (`power` 1: n * width, 2: n^2 * width), `op` (`ac`: accumulates, `mask`: a select with nothing
    added, not priced) and whose neuron's width it spans (`width_of`: q, k or v)."""

    suffix: str
    power: int
    op: str
    width_of: str


@dataclass(frozen=True)
class AttentionKind:
    """How one attention class is counted: its rows, the neurons that give q/k/v spikes, the layout of their output
    (`to_tokens` -> `[T, B, N, C]`), the neurons whose updates do not grow with the tokens, and for the linear
    attentions the neuron whose input is the sum their `ac` row measures."""

    name: str
    rows: tuple[AttentionRow, ...]
    spikes: tuple[str, ...]
    to_tokens: Callable[[torch.Tensor], torch.Tensor]
    token_free: frozenset[str] = frozenset()
    summed: str | None = None  # the neuron whose input is the sum the `ac` row adds up (the linear attentions)
    summed_per_token: bool = False  # that input still has the tokens as its last axis (QKFormer) or not (SDT)


_SSA_ROWS = (AttentionRow("qk", 2, "ac", "q"), AttentionRow("av", 2, "ac", "v"))
ATTENTION_KINDS: dict[type, AttentionKind] = {
    SSA: AttentionKind("ssa", _SSA_ROWS, ("q_lif", "k_lif", "v_lif"), sequence_tokens),
    QKFormerSSA: AttentionKind("ssa", _SSA_ROWS, ("q_lif", "k_lif", "v_lif"), map_tokens),
    SpikeDrivenSelfAttention: AttentionKind(
        "sdsa",
        (AttentionRow("kv_sum", 1, "ac", "k"), AttentionRow("q_mask", 1, "mask", "q")),
        ("q_lif", "k_lif", "v_lif"),
        map_tokens,
        token_free=frozenset({"talking_heads_lif"}),  # one neuron per (head, channel): SN(sum over tokens of k * v)
        summed="talking_heads_lif",
    ),
    TokenQKAttention: AttentionKind(
        "qkta",
        (AttentionRow("q_sum", 1, "ac", "q"), AttentionRow("k_mask", 1, "mask", "k")),
        ("q_lif", "k_lif"),
        map_tokens,
        summed="attn_lif",  # [T, B, heads, 1, N]: one sum per token and head
        summed_per_token=True,
    ),
}
ORDER_DEPENDENT = ("qk", "av")  # the SSA products, whose cost depends on the order they are multiplied in


def attention_kind(module: nn.Module) -> AttentionKind | None:
    return ATTENTION_KINDS.get(type(module))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, AttentionKind]]:
    """Every attention of a known kind, `(path, module, kind)`, in module order (forward order for every family)."""
    return [(name, m, kind) for name, m in model.named_modules() if (kind := attention_kind(m)) is not None]


@dataclass(frozen=True)
class AttentionSpec:
    """What one block's attention saw in the trace (per image): time steps, tokens, neuron widths, heads."""

    path: str
    kind: str
    timesteps: int
    tokens: int
    widths: dict[str, int]  # q / k / v -> channels of that neuron's output
    heads: int

    @property
    def width(self) -> int:
        return self.widths["q"]


def attention_macs(T: int, tokens: int, width: int, num_heads: int, order: str) -> tuple[int, int]:
    """MACs of the two SSA products: `qk_v` = (Q.K^T).V (n^2*D each), `q_kv` = Q.(K^T.V) (n*D*d_h each)."""
    if order == "qk_v":
        return T * tokens * tokens * width, T * tokens * tokens * width
    head_dim = width // num_heads
    return T * tokens * width * head_dim, T * tokens * width * head_dim
