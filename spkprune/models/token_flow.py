"""How tokens flow through a family's blocks when token selectors are attached: one block loop for every family.

A selector before block b (`model.token_selectors[str(b)]`, see `spkprune.models.selector`) ranks the tokens still
active and keeps the best `k`. What happens to the others is the selector's `action`:

- `drop` (SparseSpikformer): they leave the model. Later blocks never see them and the final pooling averages the
  kept tokens only.
- `skip` (TP-Spikformer's block-level early stopping): they stop being updated and are carried forward unchanged,
  with the value they had when they stopped, to the final pooling, which averages all N tokens. Blocks from b on
  run on the active tokens only (which attend only among themselves), so the work is the same as dropping them.

Both run gathered (`[T, B, K, C]`: later work really shrinks) or masked (all tokens stay, a `[B, N]` keep mask goes
to the blocks, which exclude masked tokens from attention sums and from BatchNorm statistics in training; a skipped
token's block output is replaced by its input). The two give the same logits in eval mode.

Families differ only in the layout their blocks pass: a `TokenLayout` converts it to the selectors' `[T, B, N, C]`
token list and back. Spikformer's blocks pass token lists; the Spike-driven Transformer's and QKFormer's pass maps
`[T, B, C, H, W]` whose H*W positions are the tokens; their blocks are pointwise (1x1 convs) but for attention, so a
map of K gathered tokens is `[T, B, C, K, 1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class TokenLayout:
    """How a family's blocks hold tokens: to and from the `[T, B, N, C]` token list selectors read."""

    to_tokens: Callable[[Tensor], Tensor]
    from_tokens: Callable[[Tensor, Tensor], Tensor]  # (tokens, a tensor of the family layout) -> family layout
    keep_view: Callable[[Tensor, Tensor], Tensor]  # (keep [B, N], x) -> keep broadcastable against x


def _maps_to_tokens(x: Tensor) -> Tensor:
    return x.flatten(3).transpose(2, 3)


def _tokens_to_maps(tokens: Tensor, like: Tensor) -> Tensor:
    # Contiguous, as the blocks' own maps are: a convolution's kernel, and so its rounding, follows the layout.
    maps = tokens.transpose(2, 3).contiguous()
    if maps.shape[3] == like.shape[3] * like.shape[4]:  # as many positions as `like`: its grid again
        return maps.view(*maps.shape[:3], *like.shape[3:])
    return maps.unsqueeze(-1)  # another count (K gathered, or all N after gathered blocks): a K x 1 map


SEQUENCE = TokenLayout(
    to_tokens=lambda x: x,
    from_tokens=lambda tokens, _like: tokens,
    keep_view=lambda keep, _x: keep.view(1, *keep.shape, 1),
)
MAPS = TokenLayout(
    to_tokens=_maps_to_tokens,
    from_tokens=_tokens_to_maps,
    keep_view=lambda keep, x: keep.view(1, keep.shape[0], 1, *x.shape[3:]),
)


def run_blocks(
    x: Tensor,
    blocks: Iterable[tuple[int, nn.Module]],
    selectors: Mapping[int, nn.Module],
    layout: TokenLayout,
) -> tuple[Tensor, Tensor | None]:
    """Run `blocks` (`(index, block)` pairs in forward order; `block(x, keep)`) with the selector of each index in
    `selectors` before its block. Returns the last block's output and the `[B, N]` keep mask the final pooling must
    apply (None: every token in the output counts)."""
    skipping = any(selector.action == "skip" for selector in selectors.values())
    keep: Tensor | None = None
    carried: Tensor | None = None  # skip, gathered: all N tokens at their original positions, at their last values
    positions: Tensor | None = None  # [B, K] original positions of gathered tokens (None: all N, in order)
    for index, block in blocks:
        selector = selectors.get(index)
        if selector is not None:
            tokens = layout.to_tokens(x)
            if skipping and keep is None:
                carried = place(carried, tokens, positions)
            tokens, keep = selector(tokens, keep)
            if keep is None:  # gathered
                positions = selector.track.index
            x = layout.from_tokens(tokens, x)
        out = block(x, keep)
        if skipping and keep is not None:  # masked: a skipped token keeps its incoming value
            out = torch.where(layout.keep_view(keep, out), out, x)
        x = out
    if not skipping:
        return x, keep
    if positions is not None:
        x = layout.from_tokens(place(carried, layout.to_tokens(x), positions), x)
    return x, None


def run_token_blocks(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """`run_blocks` over `model.token_blocks()` with `model.token_selectors`, in `model.token_layout`."""
    selectors = {int(key): selector for key, selector in model.token_selectors.items()}
    return run_blocks(x, model.token_blocks(), selectors, model.token_layout)


def place(full: Tensor | None, tokens: Tensor, positions: Tensor | None) -> Tensor:
    """`full` `[T, B, N, C]` with `tokens` `[T, B, K, C]` written at their original `positions` `[B, K]`
    (out of place); all N tokens in order when `positions` is None."""
    if positions is None:
        return tokens
    T, B, K, C = tokens.shape
    return full.scatter(2, positions.view(1, B, K, 1).expand(T, B, K, C), tokens)


def dense_block_tokens(model: nn.Module) -> list[int]:
    """Tokens each block sees without selectors: `model.block_tokens()` where a family has it (QKFormer's stages
    differ), else `num_tokens` for every block."""
    if hasattr(model, "block_tokens"):
        return list(model.block_tokens())
    return [model.num_tokens] * model.config.depth


def mean_over_kept(values: Tensor, keep: Tensor | None) -> Tensor:
    """Mean over the last axis (token positions) of `values` `[T, B, C, N]`, over kept tokens only when `keep`
    `[B, N]` is given."""
    if keep is None:
        return values.mean(-1)
    weights = keep.to(values.dtype).view(1, keep.shape[0], 1, keep.shape[1])
    return (values * weights).sum(-1) / weights.sum(-1).clamp_min(1)


def batch_norm_kept(bn: nn.Module, y: Tensor, keep: Tensor | None) -> Tensor:
    """BatchNorm of `y` `[T*B, C, *positions]` whose statistics, in training, come from the kept positions only
    (`keep` `[B, N]`); masked positions come out 0. In eval mode BatchNorm is per element: plain `bn(y)`."""
    if keep is None or not bn.training:
        return bn(y)
    rows_kept = keep.repeat(y.shape[0] // keep.shape[0], 1)  # [T*B, N]: row t*B + b is image b
    flat = y.flatten(2).transpose(1, 2)  # [T*B, N, C]
    rows = flat[rows_kept]
    normed = bn(rows.view(*rows.shape, *([1] * (y.dim() - 2))))
    out = flat.new_zeros(flat.shape)
    out[rows_kept] = normed.view(rows.shape)
    return out.transpose(1, 2).reshape(y.shape)


def token_mask(keep: Tensor | None, like: Tensor, axis: int) -> Tensor | None:
    """`keep` `[B, N]` as a float mask broadcastable against `like` `[T, B, ...]` with the tokens on `axis`."""
    if keep is None:
        return None
    shape = [1] * like.dim()
    shape[1], shape[axis] = keep.shape
    return keep.to(like.dtype).view(shape)


__all__ = [
    "MAPS",
    "SEQUENCE",
    "TokenLayout",
    "batch_norm_kept",
    "dense_block_tokens",
    "mean_over_kept",
    "place",
    "run_blocks",
    "run_token_blocks",
    "token_mask",
]
