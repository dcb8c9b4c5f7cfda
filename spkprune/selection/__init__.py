"""Token selection (SparseSpikformer's Spiking Token Selector): fine-tuning with the selection loss, and the
firing-rate analysis of kept and dropped tokens. The selector module itself is `spkprune.models.selector`."""

from spkprune.selection.analysis import (
    TokenAnalysis,
    analysis_model,
    analyze_tokens,
    plot_kept_tokens,
    plot_rate_summary,
    plot_token_rates,
    rate_table,
    sample_images,
    write_analysis,
)
from spkprune.selection.finetune import (
    SelectionConfig,
    SelectionResult,
    finetune_config,
    kept_summary,
    select_tokens,
    teacher_model,
)
from spkprune.selection.loss import SelectionLoss, distillation_loss, keep_ratio_loss

__all__ = [
    "SelectionConfig",
    "SelectionLoss",
    "SelectionResult",
    "TokenAnalysis",
    "analysis_model",
    "analyze_tokens",
    "distillation_loss",
    "finetune_config",
    "keep_ratio_loss",
    "kept_summary",
    "plot_kept_tokens",
    "plot_rate_summary",
    "plot_token_rates",
    "rate_table",
    "select_tokens",
    "teacher_model",
    "sample_images",
    "write_analysis",
]
