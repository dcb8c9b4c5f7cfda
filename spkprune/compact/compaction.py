"""A checkpoint with masks -> the smaller dense model (any family with structures) that computes the same outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spkprune.checkpoint import Checkpoint, build_model
from spkprune.checkpoint.formats import canonical_weights
from spkprune.compact.cut import cut
from spkprune.compact.plan import KINDS, plan_compaction
from spkprune.errors import SpkpruneError

# Metadata of the source that no longer describes the compacted model (recomputed or stale).
_STALE_META = ("sparsity", "flops", "created", "parent", "compacted")


@dataclass
class Compaction:
    checkpoint: Checkpoint  # the compacted weights, the masks that still prune kept weights, meta with "compacted"
    model: nn.Module  # the compacted model, weights loaded strictly
    removed: dict[str, dict[str, list[int]]]  # kind -> place -> removed indices
    params_before: int
    params_after: int


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def removed_summary(removed: dict[str, dict[str, list[int]]]) -> str:
    """`3 attention heads, 120 MLP hidden channels` (kinds with nothing removed left out)."""
    counts = {kind: sum(len(indices) for indices in places.values()) for kind, places in removed.items()}
    return ", ".join(f"{counts[kind]} {label}" for kind, label in KINDS.items() if kind in counts)


@torch.no_grad()
def compact_checkpoint(ckpt: Checkpoint) -> Compaction:
    """Cut out every attention head, MLP hidden channel and inner stem channel that provably changes no output of
    `ckpt`'s model in eval mode (see `spkprune.compact.plan`); SpkpruneError when there is none."""
    where = ckpt.ref or "the checkpoint"
    weights = canonical_weights(ckpt.state_dict, ckpt.masks)
    model = build_model(Checkpoint(weights, {}, ckpt.meta, ckpt.ref)).eval()
    plan = plan_compaction(model)
    removed = plan.removed()
    if not removed:
        raise SpkpruneError(
            f"{where} has nothing to remove: every attention head, MLP hidden channel and patch-splitting channel "
            "can change its outputs (prune whole heads or channels, or prune further, then compact)"
        )
    state_dict, masks = cut(weights, dict(ckpt.masks), plan)
    masks = {key: mask for key, mask in masks.items() if not bool(mask.all())}  # nothing pruned: no mask needed
    config = plan.widths(model.config)
    meta = {key: value for key, value in ckpt.meta.items() if key not in _STALE_META}
    meta["config"] = config.to_dict()
    params_before = parameter_count(model)
    compacted = Checkpoint(state_dict, masks, meta, None)
    small = build_model(compacted)
    params_after = parameter_count(small)
    meta["compacted"] = {"from": ckpt.ref, "removed": removed, "params_before": params_before,
                         "params_after": params_after}
    return Compaction(compacted, small.eval(), removed, params_before, params_after)
