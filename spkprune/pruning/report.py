"""What an IMP run reports: one row per round and kind, the accuracy-vs-sparsity plot, the JSON summary."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from spkprune.paths import save_png
from spkprune.store import Artifact


@dataclass
class RoundRow:
    round: int
    kind: str  # "ticket" or a control
    ref: str
    sparsity_prunable: float
    sparsity_total: float
    remaining_prunable: int
    remaining_total: int
    top1: float
    top5: float
    loss: float
    timesteps: int
    mask_sha256: str

    @classmethod
    def of(cls, art: Artifact, kind: str, k: int) -> "RoundRow":
        """The row of round artifact `art` (round `k` of `kind`)."""
        sparsity, metrics, imp = art.meta["sparsity"], art.meta.get("metrics", {}), art.meta["imp"]
        return cls(
            k, kind, art.ref, sparsity["prunable"], sparsity["total"], sparsity["remaining_prunable"],
            sparsity["remaining_total"], metrics.get("top1", float("nan")), metrics.get("top5", float("nan")),
            metrics.get("loss", float("nan")), imp["timesteps"], imp["mask_sha256"],
        )


@dataclass
class ImpReport:
    name: str
    rows: list[RoundRow]
    nothing_to_do: bool
    plot: Path | None = None
    settings: dict = field(default_factory=dict)

    def frame(self):
        """One row per round and kind, with the change in top-1 against round 0."""
        import pandas as pd  # pandas takes a second to import; only table output needs it

        base = next((r.top1 for r in self.rows if r.round == 0), None)
        records = []
        for row in self.rows:
            rec = dataclasses.asdict(row)
            rec["delta_top1"] = None if base is None else row.top1 - base
            records.append(rec)
        cols = [
            "round", "kind", "sparsity_prunable", "sparsity_total", "remaining_prunable", "remaining_total",
            "top1", "delta_top1", "top5", "loss", "timesteps", "ref",
        ]
        return pd.DataFrame.from_records(records, columns=cols)


_STYLE = {
    "ticket": dict(color="tab:blue", marker="o", label="winning ticket (IMP, rewound)"),
    "random-reinit": dict(color="tab:red", marker="s", linestyle="--", label="control: same masks, random re-init"),
    "random-prune": dict(color="tab:orange", marker="^", linestyle=":", label="control: random masks, same layer sparsity"),
}


def plot_imp(report: ImpReport, path: str | Path) -> Path:
    """Accuracy against sparsity over the prunable weights (ticket and controls), written atomically as PNG."""
    import matplotlib  # matplotlib takes a second to import; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    dense = next((r for r in report.rows if r.round == 0), None)
    for kind, style in _STYLE.items():
        rows = [r for r in report.rows if r.kind == kind]
        if kind != "ticket" and rows and dense is not None:
            rows = [dense] + rows
        if kind == "ticket" and report.settings.get("one_shot"):
            style = {**style, "label": "one-shot pruned (no rewind, no retraining)"}
        if rows:
            ax.plot([100 * r.sparsity_prunable for r in rows], [100 * r.top1 for r in rows], **style)
    if dense is not None:
        ax.axhline(100 * dense.top1, color="grey", linewidth=0.8, linestyle="-.", label="dense (round 0)")
    ax.set_xlabel("sparsity over prunable weights (%)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"{report.name}: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return save_png(fig, path)


def describe(report: ImpReport) -> dict:
    """The JSON-able summary that goes beside the table (`--format json`)."""
    ticket = [r for r in report.rows if r.kind == "ticket"]
    final = ticket[-1] if ticket else None
    return {
        "name": report.name,
        "nothing_to_do": report.nothing_to_do,
        "final": final.ref if final else None,
        "final_mask_sha256": final.mask_sha256 if final else None,
        "plot": str(report.plot) if report.plot else None,
        "settings": json.loads(json.dumps(report.settings)),
    }
