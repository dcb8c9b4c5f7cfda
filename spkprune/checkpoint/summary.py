"""Sparsity and per-tensor summaries of a checkpoint's weights and masks."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from spkprune.checkpoint.core import Checkpoint

BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def is_buffer_key(key: str) -> bool:
    """BatchNorm running statistics: state, not parameters (they never count towards sparsity)."""
    return key.endswith(BUFFER_SUFFIXES)


def sparsity_report(
    state_dict: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    prunable_keys: Iterable[str],
) -> dict:
    """Fraction of weights removed by `masks`, over the prunable weights and over all parameters.

    A weight counts as pruned when its mask is False; a weight that training left at exactly zero does not.
    `total` covers every parameter (the unused LayerNorms included), never BatchNorm buffers.
    """
    keys = list(prunable_keys)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"prunable keys missing from the state_dict: {missing[:3]}")
    pruned = {k: int(m.numel() - int(m.sum())) for k, m in masks.items()}
    prunable_count = sum(state_dict[k].numel() for k in keys)
    prunable_pruned = sum(pruned.get(k, 0) for k in keys)
    params = [k for k in state_dict if not is_buffer_key(k)]
    total_count = sum(state_dict[k].numel() for k in params)
    total_pruned = sum(pruned.get(k, 0) for k in params)
    return {
        "prunable": prunable_pruned / prunable_count if prunable_count else 0.0,
        "total": total_pruned / total_count if total_count else 0.0,
        "remaining_prunable": prunable_count - prunable_pruned,
        "remaining_total": total_count - total_pruned,
    }


def natural_key(key: str) -> list:
    """Sort key that puts `block.10` after `block.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def tensor_summary(ckpt: Checkpoint) -> list[dict]:
    """One row per tensor: key, shape, dtype, numel, exact zeros, pruned (mask False) and pruned fraction."""
    rows = []
    for key in sorted(ckpt.state_dict, key=natural_key):
        value = ckpt.state_dict[key]
        mask = ckpt.masks.get(key)
        pruned = int(mask.numel() - int(mask.sum())) if mask is not None else None
        rows.append(
            {
                "key": key,
                "shape": "x".join(str(d) for d in value.shape) or "scalar",
                "dtype": str(value.dtype).replace("torch.", ""),
                "numel": value.numel(),
                "zeros": int((value == 0).sum()),
                "pruned": pruned,
                "sparsity": pruned / value.numel() if pruned is not None and value.numel() else None,
            }
        )
    return rows
