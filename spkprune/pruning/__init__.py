"""Weight pruning: masks (what is pruned, by exact counts) and the lottery-ticket rounds (IMP, `imp.run_imp`)."""

from spkprune.pruning.imp import CONTROLS, ImpReport, RoundRow, describe, plot_imp, run_imp, share_masks
from spkprune.pruning.settings import ImpSettings, parse_rewind
from spkprune.pruning.masks import (
    Masks,
    apply_masks,
    count_pruned,
    eligible_keys,
    full_masks,
    layer_sparsity,
    magnitude_masks,
    magnitude_scores,
    mask_checksum,
    random_masks_like,
    rate_for_target,
    sparsity_schedule,
)

__all__ = [
    "CONTROLS", "ImpReport", "ImpSettings", "Masks", "RoundRow", "apply_masks", "count_pruned", "describe",
    "eligible_keys", "full_masks", "layer_sparsity", "magnitude_masks", "magnitude_scores", "mask_checksum",
    "parse_rewind", "plot_imp", "random_masks_like", "rate_for_target", "run_imp", "share_masks", "sparsity_schedule",
]
