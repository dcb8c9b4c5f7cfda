"""What each stage type does: the library call its command makes, and the stage's result read from the object
that call returns (accuracy, sparsity, tokens, counts, size, plots) for the run record and the summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from spkprune.bench.jobs import run_bench as bench_job
from spkprune.compact.jobs import run_compact as compact_job
from spkprune.counting.jobs import flops_report
from spkprune.errors import SpkpruneError
from spkprune.export.jobs import run_export as export_job
from spkprune.pruning.jobs import run_imp_command
from spkprune.selection.jobs import run_select_tokens as select_tokens_job
from spkprune.store import Artifact, Store, parse_ref
from spkprune.training.jobs import run_evaluate as evaluate_job
from spkprune.training.jobs import run_train as train_job

Log = Callable[[str], None]


def run_train(store: Store, settings, *, progress: bool, log: Log) -> dict:
    outcome = train_job(store, settings, progress=progress)
    return artifact_result(outcome.artifact) if outcome.artifact is not None else {}


def run_imp(store: Store, settings, *, progress: bool, log: Log) -> dict:
    report = run_imp_command(store, settings, progress=progress, log=log)
    tickets = [row for row in report.rows if row.kind == "ticket"]
    result = artifact_result(store.resolve(tickets[-1].ref))
    result["rounds"] = [{"round": row.round, "sparsity": row.sparsity_prunable, "top1": row.top1} for row in tickets]
    if report.plot is not None:
        result["plots"] = [str(report.plot)]
    return result


def run_select_tokens(store: Store, settings, *, progress: bool, log: Log) -> dict:
    outcome = select_tokens_job(store, settings, progress=progress, log=log)
    result = artifact_result(outcome.artifact)
    result["top1"] = outcome.result.metrics["top1"]
    result["tokens"] = tokens_text(outcome.tokens_per_block)
    if outcome.analysis is not None:
        result["plots"] = sorted(str(path) for path in outcome.analysis.pictures.values())
    return result


def run_bench(store: Store, settings, *, progress: bool, log: Log) -> dict:
    report = bench_job(store, settings, progress=progress)
    rows = [{"ref": r.ref, "throughput": r.throughput, "speedup": r.speedup, "latency_ms": r.latency_ms}
            for r in report.results]
    return {"ref": rows[-1]["ref"], "bench": rows, "throughput": rows[-1]["throughput"], "speedup": rows[-1]["speedup"]}


def run_compact(store: Store, settings, *, progress: bool, log: Log) -> dict:
    outcome = compact_job(store, settings)
    return artifact_result(outcome.artifact)


def run_evaluate(store: Store, settings, *, progress: bool, log: Log) -> dict:
    report = evaluate_job(store, settings)
    result = input_result(settings.ref, store)
    result.update({key: report.get(key) for key in ("top1", "top5", "loss")})
    result["tokens"] = tokens_text(report.get("tokens_per_block"))
    return result


def run_flops(store: Store, settings, *, progress: bool, log: Log) -> dict:
    report = flops_report(settings, store, log=log)
    totals = report.get("totals") or {}
    return {
        **input_result(settings.ref, store),
        "dense_macs": totals.get("dense_macs"),
        "macs": totals.get("nonzero_macs"),
        "sops": totals.get("sops"),
        "energy_mj": totals.get("energy_mj"),
        "tokens": tokens_text(report.get("tokens_per_block")),
    }


def run_export(store: Store, settings, *, progress: bool, log: Log) -> dict:
    outcome = export_job(store, settings)
    folder = Path(outcome.export.folder)
    files = [path for path in folder.rglob("*") if path.is_file()]
    return {
        "ref": str(folder),
        "size": sum(path.stat().st_size for path in files),
        "plots": sorted(str(path) for path in files if path.suffix == ".png"),
    }


def artifact_result(art: Artifact) -> dict:
    meta = art.meta
    metrics = meta.get("metrics") or {}
    sparsity = meta.get("sparsity") or {}
    selector = meta.get("selector") or {}
    return {
        "ref": art.ref,
        "top1": metrics.get("top1"),
        "sparsity": sparsity.get("prunable") if isinstance(sparsity, dict) else sparsity,
        "keep": selector.get("keep") if isinstance(selector, dict) else None,
        "size": art.size,
    }


def input_result(source: str | None, store: Store) -> dict:
    """What a counting / evaluation stage inherits from the model it read (when that model is in the store)."""
    if not source:
        return {}
    if store is None:
        return {"ref": source}
    try:
        art = store.get(*parse_ref(source))
    except SpkpruneError:  # a preset, a path or an hf:// reference
        art = None
    if art is None:
        return {"ref": source}
    result = artifact_result(art)
    result.pop("top1")
    return result


def tokens_text(per_block) -> str | None:
    """Tokens each block sees, as `16, 11` (None when not reported)."""
    counts = [int(n) for n in (per_block or []) if n is not None]
    return ", ".join(map(str, counts)) if counts else None
