"""`spkprune flops report REF_OR_PRESET`: dense MACs, nonzero-weight MACs, SOPs and energy per layer and in total."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.cli.app import app, store_dir
from spkprune.cli.render import check_format, render_frame, stderr
from spkprune.errors import SpkpruneError

flops_app = typer.Typer(help="Count operations and energy (dense MACs, nonzero-weight MACs, SOPs).", no_args_is_help=True)
app.add_typer(flops_app, name="flops")

_DISPLAY = {  # column -> (header, divisor) for people; json/csv keep raw per-image counts
    "dense_macs": ("dense MMAC", 1e6),
    "nonzero_macs": ("nonzero MMAC", 1e6),
    "sops": ("SOPs (M)", 1e6),
    "energy_pj": ("energy (nJ)", 1e3),
}


@flops_app.command("report")
def report(
    ctx: typer.Context,
    ref: str = typer.Argument(..., metavar="REF_OR_PRESET", help="A preset name or a checkpoint reference."),
    keep: str = typer.Option(None, "--keep", help="What-if token keep ratio rho (cumulative rho, rho^2, ...) or one "
                             "cumulative ratio per selector location: 0.7 or 0.9,0.7,0.5."),
    dataset: str = typer.Option(None, "--dataset", help="Measure firing rates, SOPs and energy on this data set."),
    data_dir: str = typer.Option(None, "--data-dir", help="Root of the data set (not needed for digits)."),
    batches: int = typer.Option(4, "--batches", help="Test batches to measure on."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per batch."),
    e_mac: float = typer.Option(4.6, "--e-mac", help="Energy per MAC in pJ (45 nm fp32)."),
    e_ac: float = typer.Option(0.9, "--e-ac", help="Energy per accumulate in pJ (45 nm fp32)."),
    by: str = typer.Option("layer", "--by", help="Rows per layer or per block: layer|block."),
    fmt: str = typer.Option("table", "--format", help="table|json|csv|md"),
    save: bool = typer.Option(None, "--save/--no-save", help="Store the report with the checkpoint (default: on "
                              "for store references)."),
) -> None:
    """Per-layer dense MACs (x T, the papers' convention), nonzero-weight MACs, and with --dataset SOPs and energy."""
    from spkprune.counting import attach_report, count_operations, rows_by_block
    from spkprune.counting.report import check_whatif
    from spkprune.counting.sources import dataset_batches, is_stored, load_model, open_store_if_any, parse_keep

    check_format(fmt)
    if by not in ("layer", "block"):
        raise SpkpruneError(f"unknown --by {by!r}; choose layer or block")
    ratios = parse_keep(keep)
    check_whatif(ratios, bool(dataset))
    store = open_store_if_any(store_dir(ctx))
    model, masks, source = load_model(ref, store)
    stored = is_stored(ref, store)
    if save and not stored:
        raise SpkpruneError(f"--save keeps the report with a checkpoint in the store, and {ref!r} is not one")
    data = None
    if dataset:
        data = dataset_batches(model, dataset, data_dir, batches, batch_size)
        stderr.print(f"measuring {model.name} on {batches} batch(es) of {batch_size} from {dataset} ...")
    result = count_operations(
        model, masks=masks, keep=ratios, batches=data, e_mac=e_mac, e_ac=e_ac,
        dataset=dataset, num_batches=batches if dataset else None,
    )  # fmt: skip
    result["source"] = {"ref": ref, "kind": source}
    if source == "preset" and dataset:
        result["notes"].append("preset with freshly initialised weights: firing rates are not a trained model's")
    if stored and save is not False:
        attach_report(store, store.resolve(ref).ref, result)
    _render(result, rows_by_block(result["rows"]) if by == "block" else result["rows"], fmt)


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
