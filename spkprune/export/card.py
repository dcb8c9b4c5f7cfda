"""The model card (`README.md`) of an exported folder: Hub YAML front matter and a body a person can use."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import yaml

from spkprune.checkpoint.formats import DENSE_FILE, MASKS_FILE, SPARSE_FILE
from spkprune.models import family_of_meta

_TASK = {"type": "image-classification", "name": "Image Classification"}


def card_tags(meta: Mapping[str, Any], has_masks: bool) -> list[str]:
    tags = ["spiking-neural-network", "spikformer"]
    if has_masks:
        tags += ["lottery-ticket", "sparse"]
    if meta.get("selector"):
        tags.append("token-pruning")
    return tags


def front_matter(meta: Mapping[str, Any], name: str, has_masks: bool) -> dict:
    """The YAML header the Hub reads: library, tags, datasets, metrics and a model-index with the accuracy."""
    dataset = _dataset(meta)
    header: dict[str, Any] = {"library_name": "spkprune", "tags": card_tags(meta, has_masks)}
    if dataset:
        header["datasets"] = [dataset]
    top1 = (meta.get("metrics") or {}).get("top1")
    if top1 is not None:
        header["metrics"] = ["accuracy"]
        header["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": dict(_TASK),
                        "dataset": {"name": dataset or "unknown", "type": dataset or "unknown"},
                        "metrics": [{"type": "accuracy", "value": round(float(top1), 6), "name": "Top-1 accuracy"}],
                    }
                ],
            }
        ]
    return header


def _dataset(meta: Mapping[str, Any]) -> str | None:
    return (meta.get("train") or {}).get("dataset") or (meta.get("config") or {}).get("dataset")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of dict rows (columns default to the keys of the first row)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _pct(value: Any) -> str | None:
    return f"{100 * float(value):.1f}%" if isinstance(value, (int, float)) else None


def lineage_rows(chain: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Round table rows from (ref, meta) records, oldest first: ref, prunable sparsity, top-1."""
    rows = []
    for record in chain:
        meta = record.get("meta") or {}
        rows.append(
            {
                "checkpoint": record.get("ref"),
                "sparsity (prunable)": _pct((meta.get("sparsity") or {}).get("prunable")),
                "top-1": _pct((meta.get("metrics") or {}).get("top1")),
            }
        )
    return rows


def _rounds_section(meta: Mapping[str, Any], lineage: Sequence[Mapping[str, Any]]) -> str:
    rounds = meta.get("rounds")
    if isinstance(rounds, list) and rounds and all(isinstance(r, Mapping) for r in rounds):
        table = markdown_table(rounds)
    elif lineage:
        table = markdown_table(lineage_rows(lineage))
    else:
        return ""
    return "## Lineage, round by round\n\n" + table + "\n"


# The store keeps metadata with sorted keys; the card shows the report's columns in reading order.
_FLOPS_COLUMNS = ("layer", "kind", "block", "tokens", "op", "weight_sparsity", "firing_rate", "dense_macs",
                  "nonzero_macs", "sops", "energy_pj")
_TOTALS_COLUMNS = ("dense_macs", "nonzero_macs", "macs", "sops", "energy_mj", "lif_updates")


def _ordered(keys: Sequence[str], preferred: Sequence[str]) -> list[str]:
    return [k for k in preferred if k in keys] + [k for k in keys if k not in preferred]


def _flops_section(flops: Any) -> str:
    if not isinstance(flops, Mapping):
        return ""
    parts = ["## Operations and energy\n"]
    rows = flops.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, Mapping) for r in rows):
        parts.append(markdown_table(rows, _ordered(list(rows[0]), _FLOPS_COLUMNS)))
    totals = flops.get("totals")
    if isinstance(totals, Mapping) and totals:
        parts.append("\n**Totals**\n\n" + markdown_table([dict(totals)], _ordered(list(totals), _TOTALS_COLUMNS)))
    notes = {k: v for k, v in flops.items() if k not in ("rows", "totals")}
    if notes:
        parts.append("\n" + "\n".join(f"- {k}: {_cell(v)}" for k, v in notes.items()))
    return "\n".join(parts) + "\n" if len(parts) > 1 else ""


_SPEED_COLUMNS = (("batch_size", "throughput batch"), ("latency_ms", "latency ms (batch 1, median)"),
                  ("latency_p90_ms", "p90 ms"), ("throughput", "images/s"), ("peak_memory_mb", "peak memory MB"),
                  ("speedup", "speed-up"), ("dense_macs", "dense MACs"), ("nonzero_macs", "nonzero MACs"))


def _speed_section(bench: Any) -> str:
    """`spkprune bench`'s stored result (`meta["bench"]`): the measured figures and the machine they belong to."""
    if not isinstance(bench, Mapping) or "throughput" not in bench:
        return ""
    row = {header: bench.get(key) for key, header in _SPEED_COLUMNS}
    machine = bench.get("machine") if isinstance(bench.get("machine"), Mapping) else {}
    settings = bench.get("settings") if isinstance(bench.get("settings"), Mapping) else {}
    where = _machine_text(machine)
    path = "fast inference path" + (", compiled neurons" if settings.get("compile") else "")
    lines = [
        "## Measured speed\n",
        f"Measured with `spkprune bench` ({path}) on {where or 'an unrecorded machine'}"
        + (f", {bench['measured_at']}" if bench.get("measured_at") else "") + ". Speed on another machine differs.\n",
        markdown_table([row]) + "\n",
    ]
    if bench.get("baseline") is not None:
        lines.append(f"- speed-up: throughput against `{_cell(bench['baseline'])}`, measured in the same run")
    if bench.get("peak_memory"):
        lines.append(f"- peak memory: {_cell(bench['peak_memory'])}")
    return "\n".join(lines) + "\n"


def _machine_text(machine: Mapping[str, Any]) -> str:
    """`AMD EPYC, 2 cores, 1 torch threads, torch 2.4.1` from a stored machine description."""
    parts = [machine.get("gpu") or machine.get("cpu")]
    for key, text in (("cores", "{} cores"), ("torch_threads", "{} torch threads"), ("torch", "torch {}")):
        if machine.get(key) is not None:
            parts.append(text.format(machine[key]))
    return ", ".join(str(part) for part in parts if part)


def _summary(meta: Mapping[str, Any], fmt: str, dtype: str) -> str:
    config = meta.get("config") or {}
    sparsity = meta.get("sparsity") or {}
    metrics = meta.get("metrics") or {}
    facts = [
        ("family", _family_text(meta)),
        ("architecture", meta.get("arch")),
        ("dataset", _dataset(meta)),
        ("embedding dim / depth / heads", "/".join(str(config.get(k, "?")) for k in ("embed_dim", "depth", "num_heads"))
         if config else None),
        ("timesteps", config.get("timesteps")),
        ("sparsity of prunable weights", _pct(sparsity.get("prunable"))),
        ("sparsity of all parameters", _pct(sparsity.get("total"))),
        ("top-1 accuracy", _pct(metrics.get("top1"))),
        ("top-5 accuracy", _pct(metrics.get("top5"))),
        ("token selector", _selector_text(meta.get("selector"))),
        ("compacted", _compacted_text(meta.get("compacted"), config)),
        ("weights file", f"`{SPARSE_FILE if fmt == 'sparse' else DENSE_FILE}` ({fmt}, {dtype}"
                         + (", lossy" if dtype != "float32" else "") + ")"),
    ]
    return "\n".join(f"- **{name}**: {value}" for name, value in facts if value not in (None, ""))


_REMOVED = {"heads": "attention heads", "mlp": "MLP hidden channels", "stem": "patch-splitting channels"}
_WIDTHS = {"block_heads": "heads per block", "block_mlp_hidden": "MLP hidden per block",
           "stem_channels": "stem channels"}


def _compacted_text(compacted: Any, config: Mapping[str, Any]) -> str | None:
    """What `spkprune compact` cut out (counts per kind and place), the widths left and the parameters."""
    if not isinstance(compacted, Mapping) or not isinstance(compacted.get("removed"), Mapping):
        return None
    removed = [
        f"{sum(len(v) for v in places.values())} {_REMOVED.get(kind, kind)} ("
        + ", ".join(f"{place}: {len(indices)}" for place, indices in places.items()) + ")"
        for kind, places in compacted["removed"].items() if isinstance(places, Mapping)
    ]
    widths = [f"{label} {config[key]}" for key, label in _WIDTHS.items() if config.get(key)]
    text = f"from {compacted.get('from')}, removed " + "; ".join(removed) + " (same outputs as the masked model)"
    if widths:
        text += "; " + ", ".join(widths)
    before, after = compacted.get("params_before"), compacted.get("params_after")
    if isinstance(before, int) and isinstance(after, int):
        text += f"; parameters {before:,} -> {after:,}"
    return text


def _selector_text(selector: Any) -> str | None:
    if not selector:
        return None
    if isinstance(selector, Mapping):
        return ", ".join(f"{k}={v}" for k, v in selector.items())
    return str(selector)


def _family_text(meta: Mapping[str, Any]) -> str | None:
    """`QKFormer (qkformer; original code: zhouchenlin2096/QKFormer)`."""
    family = family_of_meta(meta)
    return f"{family.title} (`{family.name}`; original code: {family.original})" if family else None


def _title(meta: Mapping[str, Any]) -> str:
    family = family_of_meta(meta)
    return family.title if family else "Spikformer"


def _load_section(fmt: str, hub_ref: str | None, has_masks: bool, title: str = "Spikformer") -> str:
    source = hub_ref or "path/to/this/folder"
    weights = SPARSE_FILE if fmt == "sparse" else DENSE_FILE
    text = [
        "## How to load it\n",
        "With spkprune (weights, exact masks and metadata):\n",
        "```python",
        "from spkprune.checkpoint import load_checkpoint, build_model",
        "",
        f'ckpt = load_checkpoint("{source}")',
        f"model = build_model(ckpt).eval()   # the {title} with these weights, strictly loaded",
        "```\n",
        f"From the command line: `spkprune evaluate {source}`.\n",
    ]
    if fmt == "dense":
        text += [
            f"Without spkprune, `model.safetensors` is a plain state_dict with the original {title} key names, so it "
            "loads strictly into the original code:\n",
            "```python",
            "from safetensors.torch import load_file",
            "",
            f'state_dict = load_file("{weights}")',
            f"model.load_state_dict(state_dict)   # model built with the original {title} code and this config",
            "```\n",
        ]
        if has_masks:
            text.append(f"`{MASKS_FILE}` holds the exact pruning masks as packed bits (see spkprune's docs/export.md).\n")
    else:
        text.append(
            f"`{weights}` is spkprune's compact sparse format (packed bitmask or CSR plus the kept values); "
            "docs/export.md in spkprune specifies it and has a 20-line numpy reader.\n"
        )
    return "\n".join(text)


def model_card(
    meta: Mapping[str, Any],
    *,
    name: str,
    fmt: str,
    dtype: str,
    has_masks: bool,
    lineage: Sequence[Mapping[str, Any]] = (),
    hub_ref: str | None = None,
) -> str:
    """README.md text. `lineage` is a list of {"ref", "meta"} records, oldest first, ending with this checkpoint."""
    header = yaml.safe_dump(front_matter(meta, name, has_masks), sort_keys=False, allow_unicode=True)
    what = ("a lottery ticket: the subnetwork that iterative magnitude pruning kept, with its exact mask"
            if has_masks else "a dense checkpoint")
    intro = f"# {name}\n\nA spiking transformer of the {_title(meta)} family exported by spkprune, {what}.\n"
    sections = [
        intro,
        _summary(meta, fmt, dtype) + "\n",
        _rounds_section(meta, lineage),
        _flops_section(meta.get("flops")),
        _speed_section(meta.get("bench")),
        _load_section(fmt, hub_ref, has_masks, _title(meta)),
    ]
    recipe = meta.get("recipe")
    if recipe:
        sections.append("## Recipe\n\n```yaml\n" + yaml.safe_dump(recipe, sort_keys=False) + "```\n")
    return "---\n" + header + "---\n\n" + "\n".join(s for s in sections if s)
