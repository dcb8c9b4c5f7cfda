"""What a scan reports: the rows (unit x ratio), a unit-by-ratio table of drops for people, and the heat map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spkprune.paths import save_png

COLUMNS = ["unit", "size", "ratio", "pruned", "sparsity", "top1", "drop"]


@dataclass
class SensitivityReport:
    scan: dict  # as stored: source, over, base_top1, chance, ratios, rows, ...
    ref: str  # where the scan is stored (NAME@sensitivity-OVER)
    plot: Path | None = None

    def frame(self) -> pd.DataFrame:
        """One row per unit and ratio (fractions)."""
        return pd.DataFrame(self.scan["rows"], columns=COLUMNS)

    def table(self) -> pd.DataFrame:
        """One row per unit: its size and its top-1 drop in points at each ratio."""
        frame = self.frame()
        pivot = frame.pivot(index="unit", columns="ratio", values="drop").reindex(frame["unit"].unique())
        table = pd.DataFrame({"unit": pivot.index, "size": frame.groupby("unit", sort=False)["size"].first().values})
        for ratio in pivot.columns:
            table[f"drop @{ratio:g}"] = [round(100 * value, 2) for value in pivot[ratio]]
        return table

    def summary(self) -> dict:
        scan = self.scan
        return {"source": scan["source"], "stored": self.ref, "over": scan["over"],
                "base_top1": scan["base_top1"], "images": scan["images"], "recalibrate": scan["recalibrate"],
                "plot": str(self.plot) if self.plot else None}


def plot_sensitivity(report: SensitivityReport, path: str | Path) -> Path:
    """A heat map of the top-1 drop (points) per unit and ratio, written atomically as PNG."""
    import matplotlib  # matplotlib takes a second to import; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report.table()
    values = table[[c for c in table.columns if c.startswith("drop @")]].to_numpy(dtype=float)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2.4 + 1.0 * values.shape[1], 1.2 + 0.32 * len(table)), dpi=120)
    image = ax.imshow(values, cmap="Reds", aspect="auto", vmin=min(0.0, values.min()), vmax=max(values.max(), 1.0))
    for (i, j), value in pd.DataFrame(values).stack().items():
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                color="white" if value > 0.6 * values.max() else "black")
    ratios = [c.removeprefix("drop @") for c in table.columns if c.startswith("drop @")]
    ax.set_xticks(range(len(ratios)), ratios)
    ax.set_yticks(range(len(table)), [f"{unit} ({size})" for unit, size in zip(table["unit"], table["size"])],
                  fontsize=7)
    scan = report.scan
    ax.set_xlabel(f"fraction pruned ({scan['over']} one at a time)")
    ax.set_title(f"{scan['source']}: top-1 drop (points) vs {100 * scan['base_top1']:.1f}%", fontsize=9)
    fig.colorbar(image, ax=ax, label="top-1 drop (points)")
    fig.tight_layout()
    return save_png(fig, path)
