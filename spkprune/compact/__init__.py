"""Compaction: cut what the masks removed out of a model (Spikformer, SDT, QKFormer), into a smaller dense model
with the same outputs.

- plan.py        which heads, MLP hidden channels and stem channels provably change no output
- cut.py         narrowing the state_dict and masks under the original keys
- compaction.py  compact_checkpoint: checkpoint in, compacted checkpoint and model out
- settings.py, jobs.py   `spkprune compact` as settings and a library call
"""

from spkprune.compact.compaction import Compaction, compact_checkpoint, removed_summary
from spkprune.compact.jobs import CompactOutcome, run_compact
from spkprune.compact.plan import Plan, plan_compaction, silent_channels
from spkprune.compact.settings import CompactSettings

__all__ = [
    "CompactOutcome", "CompactSettings", "Compaction", "Plan", "compact_checkpoint", "plan_compaction",
    "removed_summary", "run_compact", "silent_channels",
]
