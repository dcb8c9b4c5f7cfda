"""Automatic mixed precision: float16 autocast on CUDA; CPU runs stay in float32."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool):
    """float16 autocast when `enabled` and `device` is a CUDA device; a no-op context otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
