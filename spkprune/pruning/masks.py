"""Pruning masks: which weights may be pruned, magnitude scores, exact-count thresholds, random controls.

A mask set is a `dict[str, torch.Tensor]` keyed by state_dict key; each tensor is bool with the weight's shape,
True = kept, False = pruned. Masks only ever shrink: an entry pruned once stays pruned in every later round.

Counts are exact. Magnitude pruning never uses a float threshold (ties at the threshold would prune a few weights
too many or too few): the weights are ordered by (score, position) with a stable sort and exactly the `n` first are
pruned, so a given state_dict always yields the same mask, on every machine and every process.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping, Sequence

import torch

from spkprune.checkpoint.formats import mask_sha256
from spkprune.errors import SpkpruneError

Masks = dict[str, torch.Tensor]
SCOPES = ("global", "layerwise")


# ------------------------------------------------------------------------------------------ what is pruned
def eligible_keys(prunable: Iterable[str], exclude: Sequence[str] = ()) -> list[str]:
    """The prunable keys left after removing those matching any `exclude` glob (fnmatch, on state_dict keys).

    A pattern that matches no prunable key is an error (a typo would otherwise silently prune everything).
    """
    keys = list(prunable)
    unmatched = [p for p in exclude if not any(fnmatch.fnmatchcase(k, p) for k in keys)]
    if unmatched:
        example = ", ".join(keys[:3])
        raise SpkpruneError(
            f"--exclude pattern(s) {', '.join(repr(p) for p in unmatched)} match no prunable weight; "
            f"patterns are globs over state_dict keys such as {example} (see `spkprune show REF`)"
        )
    kept = [k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in exclude)]
    if not kept:
        raise SpkpruneError("--exclude removes every prunable weight; nothing would be left to prune")
    return kept


# --------------------------------------------------------------------------------------------- schedules
def rate_for_target(target: float, rounds: int) -> float:
    """The per-round fraction of surviving weights to remove so that `rounds` rounds reach `target`."""
    check_target(target)
    if rounds < 1:
        raise SpkpruneError(f"--rounds must be at least 1, got {rounds}")
    return 1.0 - (1.0 - target) ** (1.0 / rounds)


def check_target(target: float) -> None:
    if not (0.0 < target < 1.0):
        raise SpkpruneError(f"--target must lie strictly between 0 and 1 (a fraction of weights), got {target}")


def sparsity_schedule(rounds: int, *, target: float | None = None, rate: float | None = None) -> list[float]:
    """Cumulative sparsity after rounds 1..N: `1 - (1 - rate)^k`; with `target`, round N is exactly `target`."""
    if (target is None) == (rate is None):
        raise SpkpruneError("give exactly one of --target and --rate")
    if rounds < 1:
        raise SpkpruneError(f"--rounds must be at least 1, got {rounds}")
    if rate is None:
        rate = rate_for_target(target, rounds)
    elif not (0.0 < rate < 1.0):
        raise SpkpruneError(f"--rate must lie strictly between 0 and 1 (a fraction per round), got {rate}")
    levels = [1.0 - (1.0 - rate) ** k for k in range(1, rounds + 1)]
    if target is not None:
        levels[-1] = target  # (1 - target)^(1/N)^N is target only up to rounding
    return levels


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a cumulative `sparsity` removes (round half up, never all of them)."""
    return min(int(math.floor(numel * sparsity + 0.5)), numel - 1) if numel else 0


# ------------------------------------------------------------------------------------------------ masks
def full_masks(weights: Mapping[str, torch.Tensor], keys: Iterable[str]) -> Masks:
    """All-True masks (nothing pruned yet) for `keys`."""
    return {k: torch.ones_like(weights[k], dtype=torch.bool) for k in keys}


def magnitude_scores(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w| as float64 for every masked key; pruned entries score -inf so that they are always pruned first."""
    scores = {}
    for key, mask in masks.items():
        score = weights[key].detach().abs().to(torch.float64).cpu()
        scores[key] = score.masked_fill(~mask.cpu(), -math.inf)
    return scores


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the `n` lowest scores; ties broken by position (stable sort)."""
    order = torch.sort(scores.flatten(), stable=True).indices
    return order[:n]


def _mask_pruning(shape: torch.Size, pruned_flat: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(shape.numel(), dtype=torch.bool)
    mask[pruned_flat] = False
    return mask.view(shape)


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
) -> Masks:
    """New masks removing the smallest-magnitude weights until exactly `sparsity` of the masked weights are pruned.

    `global`: one ranking over all masked weights (`round(total * sparsity)` pruned in all);
    `layerwise`: each tensor ranked on its own (`round(numel * sparsity)` pruned per tensor).
    Already-pruned entries stay pruned (sparsity must not decrease).
    """
    if scope not in SCOPES:
        raise SpkpruneError(f"unknown --scope {scope!r}; choose global or layerwise")
    if scope == "layerwise":
        return counted_magnitude_masks(weights, masks, {k: pruned_count(m.numel(), sparsity) for k, m in masks.items()})
    scores = magnitude_scores(weights, masks)
    keys = list(scores)
    flat = torch.cat([scores[k].flatten() for k in keys])
    n = pruned_count(flat.numel(), sparsity)
    already = sum(int((~masks[k]).sum()) for k in keys)
    if n < already:
        raise ValueError(f"sparsity {sparsity} prunes {n} weights but {already} are pruned already")
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[_lowest(flat, n)] = True
    out, start = {}, 0
    for key in keys:
        size = scores[key].numel()
        out[key] = ~pruned[start : start + size].view(scores[key].shape)
        start += size
    return out


def counted_magnitude_masks(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], counts: Mapping[str, int]
) -> Masks:
    """New masks for the keys of `counts`, each pruning exactly `counts[key]` of its tensor's weights by magnitude
    (those `masks` prune already first; counts must not decrease)."""
    scores = magnitude_scores(weights, {key: masks[key] for key in counts})
    out = {}
    for key, n in counts.items():
        _check_monotone(masks[key], n, key)
        out[key] = _mask_pruning(scores[key].shape, _lowest(scores[key], n))
    return out


def _check_monotone(mask: torch.Tensor, n: int, key: str) -> None:
    already = int((~mask).sum())
    if n < already:
        raise ValueError(f"{key}: sparsity prunes {n} weights but {already} are pruned already")


def random_masks_like(masks: Mapping[str, torch.Tensor], seed: int) -> Masks:
    """Random masks with exactly the same number of pruned entries per tensor as `masks` (the random-prune control)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(masks):
        mask = masks[key]
        n = int((~mask).sum())
        order = torch.randperm(mask.numel(), generator=generator)
        out[key] = _mask_pruning(mask.shape, order[:n])
    return {k: out[k] for k in masks}


def apply_masks(state_dict: dict[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `state_dict` with pruned entries set to exactly zero."""
    out = dict(state_dict)
    for key, mask in masks.items():
        out[key] = state_dict[key].masked_fill(~mask.to(state_dict[key].device), 0)
    return out


# ----------------------------------------------------------------------------------------------- reports
def mask_checksum(masks: Mapping[str, torch.Tensor]) -> str:
    """The one mask checksum (spkprune.checkpoint.formats.mask_sha256): equal masks give equal checksums on every
    process, and an exported file's `mask_sha256` equals the checksum IMP recorded for its masks."""
    return mask_sha256(masks)


def layer_sparsity(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction pruned per tensor."""
    return {k: float((~m).sum()) / m.numel() for k, m in masks.items()}


def count_pruned(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks.values())
