"""`spkprune sweep report`: a sweep's grid points in one table, and its plots.

One row per point: the swept values, then what the point's stages recorded in the run record (the last value of
each measure along the point's stages: top-1 of its last model, sparsity, keep, tokens, the flops stage's counts, a
bench stage's throughput), completed from the point's model in the store (`meta["metrics"]`, `meta["flops"]`,
`meta["bench"]`, written by `spkprune flops report` and `spkprune bench` run by hand too). Plots (PNG, matplotlib
Agg): a heat map of top-1 over keep x sparsity, and top-1 against energy and against measured throughput with the
Pareto front marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from spkprune.errors import SpkpruneError
from spkprune.paths import save_png
from spkprune.recipes.recipe import Recipe
from spkprune.recipes.record import RunRecord
from spkprune.recipes.stages import tokens_text
from spkprune.recipes.sweep import SweepPoint, SweepRecipe
from spkprune.store import Store, parse_ref

MEASURES = {  # column -> key of a stage's recorded result
    "top1": "top1", "sparsity": "sparsity", "keep": "keep", "tokens per block": "tokens", "dense MACs": "dense_macs",
    "MACs": "macs", "SOPs": "sops", "energy (mJ)": "energy_mj", "img/s": "throughput",
}
COLUMNS = ["status", "model", *MEASURES, "pareto (energy)"]
PLOTS_DIR = "plots"


@dataclass
class SweepReport:
    recipe: SweepRecipe
    frame: pd.DataFrame  # one row per grid point
    plots: list[Path] = field(default_factory=list)


def sweep_report(recipe: Recipe, store_root: str | Path, *, out: str | Path | None = None,
                 plots: bool = True) -> SweepReport:
    """The table of `recipe`'s grid points in the store at `store_root`, and its plots under `out`
    (default STORE/plots)."""
    if not isinstance(recipe, SweepRecipe):
        raise SpkpruneError(f"recipe {recipe.name!r} has no sweep: section; `spkprune run` prints its summary")
    frame = sweep_frame(recipe, store_root)
    if not (frame["status"] == "done").any():
        raise SpkpruneError(f"no point of sweep {recipe.name!r} has finished in store {store_root}; "
                            f"run it first: spkprune run {recipe.path or 'RECIPE'}")
    report = SweepReport(recipe, frame)
    if plots:
        report.plots = draw_plots(frame, recipe, Path(out) if out else Path(store_root) / PLOTS_DIR)
    return report


def sweep_frame(recipe: SweepRecipe, store_root: str | Path) -> pd.DataFrame:
    record = RunRecord.load(Path(store_root), recipe.name)
    store = Store.existing(store_root)
    rows = [_point_row(recipe, point, record, store) for point in recipe.points]
    frame = pd.DataFrame(rows, columns=[axis.key for axis in recipe.axes] + COLUMNS)
    frame["pareto (energy)"] = pareto_mask(frame, "energy (mJ)", lower_is_better=True)
    return frame


def _point_row(recipe: SweepRecipe, point: SweepPoint, record: RunRecord, store: Store | None) -> dict:
    merged: dict[str, Any] = {}
    finished = 0
    for name in point.stages.values():
        stage = recipe.stage(name)
        entry = record.stage(name) or {}
        if entry.get("status") != "done" or entry.get("hash") != stage.hash:
            continue
        finished += 1
        merged.update({key: value for key, value in (entry.get("result") or {}).items() if value is not None})
    model = _model_ref(recipe, point)
    _complete_from_store(merged, model, store)
    status = "done" if finished == len(point.stages) else "not run" if finished == 0 else "partial"
    row = {**point.values, "status": status, "model": model}
    row.update({column: merged.get(key) for column, key in MEASURES.items()})
    row["keep"] = _keep_text(row["keep"])
    return row


def _keep_text(keep: Any) -> Any:
    """A selector's keep ratios (one per location): the ratio itself when there is one, else `0.9, 0.7`."""
    if isinstance(keep, (list, tuple)):
        return keep[0] if len(keep) == 1 else ", ".join(f"{k:g}" for k in keep)
    return keep


def _model_ref(recipe: SweepRecipe, point: SweepPoint) -> str | None:
    """The point's last model: the output of its last stage that writes one."""
    refs = [recipe.stage(name).output_ref for name in point.stages.values() if recipe.stage(name).artifact]
    return refs[-1] if refs else None


def _complete_from_store(merged: dict, model: str | None, store: Store | None) -> None:
    """Measures the run record lacks, from the model's metadata (flops and bench results added by hand too)."""
    art = store.get(*parse_ref(model)) if store is not None and model else None
    if art is None:
        return
    meta = art.meta
    totals = (meta.get("flops") or {}).get("totals") or {}
    selector = meta.get("selector") or {}
    sparsity = meta.get("sparsity")
    found = {
        "top1": (meta.get("metrics") or {}).get("top1"),
        "sparsity": sparsity.get("prunable") if isinstance(sparsity, dict) else sparsity,
        "keep": selector.get("keep") if isinstance(selector, dict) else None,
        "tokens": tokens_text((meta.get("flops") or {}).get("tokens_per_block")),
        "dense_macs": totals.get("dense_macs"), "macs": totals.get("nonzero_macs"), "sops": totals.get("sops"),
        "energy_mj": totals.get("energy_mj"), "throughput": (meta.get("bench") or {}).get("throughput"),
    }
    for key, value in found.items():
        if merged.get(key) is None and value is not None:
            merged[key] = value


def pareto_mask(frame: pd.DataFrame, cost: str, *, lower_is_better: bool) -> pd.Series:
    """True for the points no other point beats on both top-1 and `cost` (None where either is unknown)."""
    known = frame[["top1", cost]].dropna()
    mask = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    ordered = known.sort_values([cost, "top1"], ascending=[lower_is_better, False], kind="stable")
    best = float("-inf")
    for index, row in ordered.iterrows():
        mask[index] = bool(row["top1"] > best)
        best = max(best, row["top1"])
    return mask


# -------------------------------------------------------------------------------------------------- plots
def draw_plots(frame: pd.DataFrame, recipe: SweepRecipe, out: Path) -> list[Path]:
    """The heat map (when keep and sparsity both vary) and the Pareto plots (when energy / throughput are known)."""
    import matplotlib  # matplotlib takes a second to import; only the plots need it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    done = frame[frame["status"] == "done"].copy()
    drawn = []
    for draw in (_heat_map, _pareto_energy, _pareto_throughput):
        figure = draw(plt, done, recipe)
        if figure is None:
            continue
        path = out / f"{recipe.name}-{draw.__name__.strip('_').replace('_', '-')}.png"
        drawn.append(save_png(figure, path, dpi=120, bbox_inches="tight"))
    return drawn


def _heat_map(plt, done: pd.DataFrame, recipe: SweepRecipe):
    cells = done.dropna(subset=["top1", "keep", "sparsity"])
    cells = cells[cells["keep"].map(lambda keep: isinstance(keep, (int, float)))].copy()
    cells["sparsity"] = cells["sparsity"].astype(float).round(3)
    cells["keep"] = cells["keep"].astype(float)
    if cells["keep"].nunique() < 2 or cells["sparsity"].nunique() < 2:
        return None
    grid = cells.pivot_table(index="sparsity", columns="keep", values="top1", aggfunc="mean") * 100
    repeated = cells.groupby(["sparsity", "keep"]).size().max() > 1
    figure, axes = plt.subplots(figsize=(1.4 * len(grid.columns) + 2.5, 1.0 * len(grid.index) + 1.8))
    image = axes.imshow(grid.values, cmap="viridis", aspect="auto", origin="lower")
    axes.set_xticks(range(len(grid.columns)), [f"{k:g}" for k in grid.columns])
    axes.set_yticks(range(len(grid.index)), [f"{s:.3g}" for s in grid.index])
    axes.set_xlabel("token keep ratio")
    axes.set_ylabel("weight sparsity (prunable)")
    middle = (grid.values[~pd.isna(grid.values)].min() + grid.values[~pd.isna(grid.values)].max()) / 2
    for (row, col), value in pd.DataFrame(grid.values).stack().items():
        axes.text(col, row, f"{value:.1f}", ha="center", va="center", color="black" if value > middle else "white")
    figure.colorbar(image, ax=axes, label="top-1 (%)")
    axes.set_title(f"{recipe.name}: top-1 (%)" + (" (mean over the other swept values)" if repeated else ""))
    return figure


def _pareto_energy(plt, done: pd.DataFrame, recipe: SweepRecipe):
    return _pareto(plt, done, recipe, "energy (mJ)", "estimated energy per image (mJ)", lower_is_better=True)


def _pareto_throughput(plt, done: pd.DataFrame, recipe: SweepRecipe):
    return _pareto(plt, done, recipe, "img/s", "measured throughput (images/s)", lower_is_better=False)


def _pareto(plt, done: pd.DataFrame, recipe: SweepRecipe, cost: str, label: str, *, lower_is_better: bool):
    known = done.dropna(subset=["top1", cost])
    if len(known) < 2:
        return None
    front = known[pareto_mask(known, cost, lower_is_better=lower_is_better) == True].sort_values(cost)  # noqa: E712
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter(known[cost], known["top1"] * 100, color="tab:gray", label="grid point", zorder=2)
    axes.plot(front[cost], front["top1"] * 100, "o-", color="tab:red", label="Pareto front", zorder=3)
    for index, (_, row) in enumerate(known.sort_values(cost).iterrows()):
        axes.annotate(", ".join(f"{row[axis.key]}" for axis in recipe.axes), (row[cost], row["top1"] * 100),
                      textcoords="offset points", xytext=(5, 4 if index % 2 == 0 else -11), fontsize=7)
    axes.set_xlabel(label + (" (lower is better)" if lower_is_better else " (higher is better)"))
    axes.set_ylabel("top-1 (%)")
    axes.set_title(f"{recipe.name}: top-1 against {cost.split(' ')[0]}")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", title="points: " + ", ".join(axis.key for axis in recipe.axes),
                title_fontsize=8)
    return figure
