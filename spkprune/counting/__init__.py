"""Operation and energy counts for spiking transformers (Spikformer, the Spike-driven Transformer V1, QKFormer): dense
MACs, nonzero-weight MACs, SOPs and energy per layer (conventions in docs/counting.md and ../shared/COUNTING.md)."""

from spkprune.counting.activity import Activity, LayerActivity, measure_activity
from spkprune.counting.attention import ATTENTION_KINDS, AttentionKind, AttentionSpec, attention_macs
from spkprune.counting.report import (
    E_AC_PJ,
    E_MAC_PJ,
    ROW_FIELDS,
    attach_report,
    count_operations,
    configured_tokens,
    lif_updates,
    parameter_counts,
    rows_by_block,
    weight_density,
    whatif_tokens,
)
from spkprune.counting.structure import LayerSpec, Structure, trace_structure

__all__ = [
    "ATTENTION_KINDS",
    "Activity",
    "AttentionKind",
    "AttentionSpec",
    "E_AC_PJ",
    "E_MAC_PJ",
    "LayerActivity",
    "LayerSpec",
    "ROW_FIELDS",
    "Structure",
    "attach_report",
    "attention_macs",
    "configured_tokens",
    "count_operations",
    "lif_updates",
    "measure_activity",
    "parameter_counts",
    "rows_by_block",
    "trace_structure",
    "weight_density",
    "whatif_tokens",
]
