"""`spkprune flops report REF_OR_PRESET`: dense MACs, nonzero-weight MACs, SOPs and energy per layer and in total."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.cli.app import app, readable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.counting import rows_by_block
from spkprune.counting.jobs import flops_report
from spkprune.counting.settings import FlopsSettings

flops_app = typer.Typer(help="Count operations and energy (dense MACs, nonzero-weight MACs, SOPs).", no_args_is_help=True)
app.add_typer(flops_app, name="flops")

_DISPLAY = {  # column -> (header, divisor) for people; json/csv keep raw per-image counts
    "dense_macs": ("dense MMAC", 1e6),
    "nonzero_macs": ("nonzero MMAC", 1e6),
    "sops": ("SOPs (M)", 1e6),
    "energy_pj": ("energy (nJ)", 1e3),
}


@settings_command(flops_app, "report", FlopsSettings, metavars={"ref": "REF_OR_PRESET"})
def report(ctx: typer.Context, settings: FlopsSettings, fmt: str) -> None:
    """Per-layer dense MACs (x T, the papers' convention), nonzero-weight MACs, and with --dataset SOPs and energy."""
    result = flops_report(settings, readable_store(ctx), log=stderr.print)
    _render(result, rows_by_block(result["rows"]) if settings.by == "block" else result["rows"], fmt)


def _render(result: dict, rows: list[dict], fmt: str) -> None:
    frame = pd.DataFrame(rows)
    if fmt in ("json", "csv"):
        render_frame(frame, fmt, extra={k: v for k, v in result.items() if k != "rows"})
        return
    render_frame(_for_people(frame), fmt, title=f"flops report: {result['model']} (per image)", extra=_summary(result))


def _for_people(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.copy()
    for column, (header, divisor) in _DISPLAY.items():
        shown[column] = [None if v is None or pd.isna(v) else round(v / divisor, 3) for v in shown[column]]
    if "weight_sparsity" in shown:
        shown["weight_sparsity"] = [None if pd.isna(v) else round(100 * v, 2) for v in shown["weight_sparsity"]]
        shown = shown.rename(columns={"weight_sparsity": "sparsity %"})
    if "firing_rate" in shown:
        shown["firing_rate"] = [None if pd.isna(v) else round(v, 4) for v in shown["firing_rate"]]
    empty = [c for c in ("firing_rate", "sops", "energy_pj") if c in shown and shown[c].isna().all()]
    shown = shown.drop(columns=empty).rename(columns={c: h for c, (h, _) in _DISPLAY.items()})
    for column in shown.columns[shown.isna().any()]:  # blank cells, not "nan"
        shown[column] = shown[column].astype(object).where(shown[column].notna(), None)
    return shown


def _summary(result: dict) -> dict:
    totals = result["totals"]
    lines = {
        "dense MACs (x T)": f"{totals['dense_macs'] / 1e9:.4g} G",
        "nonzero-weight MACs": f"{totals['nonzero_macs'] / 1e9:.4g} G",
    }
    if totals["sops"] is not None:
        lines["SOPs (ACs)"] = f"{totals['sops'] / 1e9:.4g} G"
        lines["MACs (analog-input layers)"] = f"{totals['macs'] / 1e9:.4g} G"
        lines["energy"] = f"{totals['energy_mj']:.4g} mJ (E_MAC {result['e_mac']} pJ, E_AC {result['e_ac']} pJ)"
    lines["LIF updates"] = f"{totals['lif_updates'] / 1e6:.4g} M"
    lines["parameters used"] = f"{result['params_used']:,} ({result['params_nonzero']:,} nonzero)"
    lines["tokens per block"] = ", ".join(str(n) for n in result["tokens_per_block"])
    if result["keep"] is not None:
        lines["what-if keep"] = ", ".join(f"{r:g}" for r in result["keep"])
    if result["images"]:
        lines["measured on"] = f"{result['images']} images of {result['dataset']}"
    for i, note in enumerate(result["notes"]):
        lines[f"note {i + 1}" if len(result["notes"]) > 1 else "note"] = note
    return lines
