"""Masks under torchrun: computed once on the main process, broadcast, and checked by sha256 on every process."""

from __future__ import annotations

import torch
import torch.distributed as dist

from spkprune.pruning import masks as M
from spkprune.training import distributed


def share_masks(masks: dict[str, torch.Tensor] | None, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Broadcast the main process's masks to every process and check that all hold the same (sha256).

    Without a process group this returns `masks` unchanged. `template` gives the keys and shapes on other ranks.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return masks
    device = distributed.current().device
    out = {}
    for key in template:  # the same order everywhere: the template comes from the same stored artifact
        buf = (masks[key] if masks is not None else template[key]).to(device=device, dtype=torch.uint8).contiguous()
        dist.broadcast(buf, src=0)
        out[key] = buf.bool().cpu()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, M.mask_checksum(out))
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes hold different masks after the broadcast: {digests}")
    return out
