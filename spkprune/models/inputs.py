"""What a model of any family takes: images `[B,C,H,W]` (repeated over T) or event frames `[B,T,C,H,W]`."""

from __future__ import annotations

import torch

from spkprune.errors import SpkpruneError


def time_major(x: torch.Tensor, in_channels: int, img_size: int, timesteps: int, name: str) -> torch.Tensor:
    """The `[T,B,C,H,W]` sequence of images or event frames; one clear error for any other shape."""
    sample = (in_channels, img_size, img_size)
    if x.dim() == 4 and tuple(x.shape[1:]) == sample:
        return x.unsqueeze(0).repeat(timesteps, 1, 1, 1, 1)
    if x.dim() == 5 and tuple(x.shape[2:]) == sample:
        return x.transpose(0, 1).contiguous()
    chw = ",".join(map(str, sample))
    raise SpkpruneError(f"{name} expects images [B,{chw}] or event frames [B,T,{chw}], got {list(x.shape)}")
