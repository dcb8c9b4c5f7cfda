"""`spkprune bench REF [REF ...]`: measured inference speed, the first reference the baseline."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.bench import BenchReport, BenchSettings, run_bench
from spkprune.bench.machine import describe
from spkprune.cli.app import app, readable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr

_COLUMNS = {  # row key -> header for people (json and csv keep every key, raw)
    "ref": "ref", "timesteps": "T", "batch_size": "batch", "latency_ms": "latency ms", "latency_p90_ms": "p90 ms",
    "throughput": "images/s", "speedup": "speedup", "peak_memory_mb": "peak MB", "dense_macs": "dense MMAC",
    "nonzero_macs": "nonzero MMAC",
}


@settings_command(app, "bench", BenchSettings, presentation=("fmt", "progress"), metavars={"refs": "REF"})
def bench_command(ctx: typer.Context, settings: BenchSettings, fmt: str, progress: bool) -> None:
    """Measure inference on this machine through the fast inference path: latency at batch 1 (median, p90),
    throughput at --batch-size, peak memory and the counted MACs; speed-ups against the first reference.

    Results are stored in each store checkpoint's metadata (and so in its exported model card)."""
    report = run_bench(readable_store(ctx), settings, progress=progress)
    if fmt in ("json", "csv"):
        render_frame(pd.DataFrame(report.rows()), fmt, extra=report.summary())
        return
    stderr.print(f"measured on {describe(report.machine)}")
    render_frame(_for_people(report), fmt, title=f"bench (baseline {report.baseline})", extra=_lines(report))


def _for_people(report: BenchReport) -> pd.DataFrame:
    frame = pd.DataFrame(report.rows())[list(_COLUMNS)]
    for column in ("dense_macs", "nonzero_macs"):
        frame[column] = (frame[column] / 1e6).round(3)
    for column, digits in (("latency_ms", 3), ("latency_p90_ms", 3), ("throughput", 1), ("speedup", 3)):
        frame[column] = frame[column].round(digits)
    frame["peak_memory_mb"] = [None if pd.isna(v) else round(v, 1) for v in frame["peak_memory_mb"]]
    return frame.rename(columns=_COLUMNS)


def _lines(report: BenchReport) -> dict:
    settings = report.settings
    lines = {
        "repeats": f"{settings['repeats']} interleaved after {settings['warmup']} warm-up",
        "compile": "yes" if settings["compile"] else "no",
        "peak memory": report.memory_method,
    }
    saved = [r.saved_to for r in report.results if r.saved_to]
    if saved:
        lines["saved in"] = ", ".join(saved)
    for i, note in enumerate(report.notes, 1):
        lines[f"note {i}"] = note
    return lines
