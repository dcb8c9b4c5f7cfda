"""`spkprune compact REF --name NAME`: cut what the masks removed out of the model, same outputs, smaller file."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.cli.app import app, writable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.compact.compaction import removed_summary
from spkprune.compact.jobs import CompactOutcome, run_compact
from spkprune.compact.plan import KINDS
from spkprune.compact.settings import CompactSettings


@settings_command(app, "compact", CompactSettings)
def compact_command(ctx: typer.Context, settings: CompactSettings, fmt: str) -> None:
    """Remove physically the attention heads, MLP hidden channels and patch-splitting channels that the masks left
    unused (nothing reads them, or their neurons provably never fire): a smaller dense model with the same
    outputs, saved as NAME with its widths per block in its configuration."""
    outcome = run_compact(writable_store(ctx), settings)
    compaction = outcome.compaction
    if fmt in ("table", "md"):
        stderr.print(f"compacted {compaction.checkpoint.meta['compacted']['from']} into {outcome.artifact.ref}: "
                     f"removed {removed_summary(compaction.removed)}")
    render_frame(_widths(outcome), fmt, title=f"compacted {outcome.artifact.ref}", extra=_summary(outcome))


def _widths(outcome: CompactOutcome) -> pd.DataFrame:
    rows = []
    for kind, places in outcome.compaction.removed.items():
        for place, indices in places.items():
            rows.append({"kind": KINDS[kind], "where": place, "removed": len(indices), "indices": _ranges(indices)})
    return pd.DataFrame(rows, columns=["kind", "where", "removed", "indices"])


def _ranges(indices: list[int]) -> str:
    """`0-9,12,14-15`: removed indices as runs."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _summary(outcome: CompactOutcome) -> dict:
    compaction = outcome.compaction
    config = compaction.model.config
    summary = {
        "ref": outcome.artifact.ref,
        "parent": compaction.checkpoint.meta["compacted"]["from"],
        "params_before": compaction.params_before,
        "params_after": compaction.params_after,
        "heads_per_block": _listed(config, "block_heads"),
        "mlp_hidden_per_block": _listed(config, "block_mlp_hidden"),
        "stem_channels": _listed(config, "stem_channels"),
        "bytes_after": outcome.size_after,
    }
    if outcome.size_before is not None:
        summary["bytes_before"] = outcome.size_before
    return summary


def _listed(config, field: str) -> list[int] | None:
    """A width field of the compacted configuration; None where the family has no such structure (QKFormer's stem)."""
    widths = getattr(config, field, None)
    return None if widths is None else list(widths)
