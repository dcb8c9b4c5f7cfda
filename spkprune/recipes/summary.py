"""The end-of-run summary: one row per stage with what it produced and what it costs."""

from __future__ import annotations

import pandas as pd

from spkprune.recipes.runner import RunReport, StageOutcome

COLUMNS = [
    "stage", "type", "status", "artifact", "top1", "sparsity", "tokens per block", "MACs", "SOPs", "energy (mJ)",
    "size (bytes)", "img/s", "speed-up", "seconds",
]


def _status(outcome: StageOutcome) -> str:
    return {"skip": "skipped", "run": "ran", "resume": "resumed"}.get(outcome.action, outcome.action)


def summary_frame(report: RunReport) -> pd.DataFrame:
    rows = []
    for outcome in report.outcomes:
        result = outcome.result or {}
        rows.append({
            "stage": outcome.stage,
            "type": outcome.type,
            "status": _status(outcome),
            "artifact": result.get("ref") or outcome.output,
            "top1": result.get("top1"),
            "sparsity": result.get("sparsity"),
            "tokens per block": result.get("tokens"),
            "MACs": result.get("macs"),
            "SOPs": result.get("sops"),
            "energy (mJ)": result.get("energy_mj"),
            "size (bytes)": result.get("size"),
            "img/s": result.get("throughput"),
            "speed-up": result.get("speedup"),
            "seconds": round(outcome.seconds, 1),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def plan_frame(outcomes: list[StageOutcome]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"stage": o.stage, "type": o.type, "action": o.action, "why": o.reason, "hash": o.hash, "output": o.output}
         for o in outcomes],
        columns=["stage", "type", "action", "why", "hash", "output"],
    )
