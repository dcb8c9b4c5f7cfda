"""The flops report: per-layer dense MACs, nonzero-weight MACs, SOPs and energy, with totals (COUNTING.md).

`count_operations(model, ...)` is the library entry point; the CLI (`spkprune flops report`) renders its dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from spkprune.counting.activity import Activity, effective_weight, measure_activity
from spkprune.counting.attention import attention_macs
from spkprune.counting.structure import LayerSpec, Structure, trace_structure
from spkprune.errors import SpkpruneError
from spkprune.models.selector import cumulative_keep, selectors_of, tokens_kept

E_MAC_PJ = 4.6  # Horowitz (ISSCC 2014), 45 nm fp32: mult 3.7 + add 0.9
E_AC_PJ = 0.9  # fp32 add
ATTENTION_ORDERS = ("qk_v", "q_kv")
ROW_FIELDS = (
    "layer", "kind", "block", "tokens", "op", "weight_sparsity",
    "dense_macs", "nonzero_macs", "firing_rate", "sops", "energy_pj",
)  # fmt: skip
SUM_FIELDS = ("dense_macs", "nonzero_macs", "sops", "energy_pj")
NOTE_NEEDS_DATA = "SOPs and energy need data: pass --dataset D --batches N"


@dataclass(frozen=True)
class TokenCounts:
    """Tokens per block per time step: the mean and the mean of the square (attention grows with n^2)."""

    mean: list[float]
    mean_sq: list[float]

    @classmethod
    def fixed(cls, counts: list[int]) -> "TokenCounts":
        return cls([float(n) for n in counts], [float(n * n) for n in counts])


# ------------------------------------------------------------------------------------------------ token counts
def _latest(ratios: dict[int, float], structure: Structure, block: int) -> float | None:
    """The cumulative keep ratio in force at `block`: the last selector location at or before it among the blocks
    that share its tokens (a patch embedding between stages needs the whole grid, so it starts over)."""
    run = [b for b in structure.segment_of(block) if b <= block and b in ratios]
    return ratios[run[-1]] if run else None


def _tokens_at(structure: Structure, block: int, ratio: float | None) -> int:
    n = structure.traced_tokens[block]
    return n if ratio is None else tokens_kept(n, ratio)


def whatif_tokens(
    model: nn.Module, keep: float | list[float], structure: Structure | None = None
) -> tuple[list[float], list[int]]:
    """Cumulative keep ratios and tokens per block if tokens were gathered with `keep` before the selector locations
    (the model's own selectors, else `model.selector_locations()`): one ratio rho keeps [rho, rho^2, ...] of the
    tokens its blocks see (each block's own count, from the trace: QKFormer's stages differ)."""
    structure = structure or trace_structure(model)
    locations = sorted(int(k) for k in model.token_selectors) or model.selector_locations()
    if not locations:
        if structure.depth < 2:
            raise SpkpruneError(f"{model.name} has {structure.depth} block(s): --keep needs at least 2 blocks")
        rule = getattr(model, "selector_rule", None)
        raise SpkpruneError(
            f"--keep gathers tokens before the selector locations and {model.name} has none"
            + (f" ({rule})" if rule else "")
        )
    ratios = cumulative_keep(keep if isinstance(keep, (int, float)) else list(keep), locations)
    by_location = dict(zip(locations, ratios))
    counts = []
    for block in range(structure.depth):
        counts.append(_tokens_at(structure, block, _latest(by_location, structure, block)))
        if block in by_location and counts[-1] < 1:
            raise SpkpruneError(
                f"keep ratio {by_location[block]:g} before block {block} leaves 0 of "
                f"{structure.traced_tokens[block]} tokens"
            )
    return ratios, counts


def configured_tokens(model: nn.Module, structure: Structure | None = None) -> list[int]:
    """Tokens per block at inference with the model's own selectors (each block's traced count for a dense model;
    `int(n * keep_ratio)` after a selector, n the tokens of the selector's block)."""
    structure = structure or trace_structure(model)
    ratios = {block: selector.keep_ratio for block, selector in selectors_of(model).items()}
    return [_tokens_at(structure, b, _latest(ratios, structure, b)) for b in range(structure.depth)]


# ----------------------------------------------------------------------------------------------------- weights
def weight_density(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
    """Fraction of nonzero entries of every Conv/Linear weight (after its mask), by state_dict key (1 for every
    weight of a model on the meta device)."""
    masks = masks or {}
    state = dict(model.named_parameters())
    return {
        # a weightless model (the meta device) has no values to be zero: every weight counts
        key: 1.0 if w.is_meta else float((effective_weight(w.detach(), masks.get(key)) != 0).sum()) / w.numel()
        for key, w in state.items()
        if key.endswith(".weight") and w.dim() >= 2
    }


def parameter_counts(model: nn.Module, density: Mapping[str, float]) -> tuple[int, int]:
    """(parameters used in forward, of which nonzero: used minus the zeroed entries of prunable weights)."""
    used = model.used_parameter_count()
    zeroed = sum(round(w.numel() * (1 - density[k])) for k, w in model.prunable_weights().items() if k in density)
    return used, used - zeroed


# -------------------------------------------------------------------------------------------------------- rows
def _dense_macs(spec: LayerSpec, structure: Structure, tokens: TokenCounts, order: str) -> float:
    if spec.token_block is None:
        return float(spec.macs)
    block = spec.token_block
    traced = structure.traced_tokens[block]
    if spec.product is not None and order == "q_kv":  # an SSA product counted in the Q.(K^T.V) order: linear in n
        attn = structure.attention[block]
        width = attn.widths["q" if spec.product == "qk" else "v"]
        qk, av = attention_macs(attn.timesteps, traced, width, attn.heads, order)
        return (qk if spec.product == "qk" else av) * tokens.mean[block] / traced
    if spec.token_power == 2:
        return spec.macs * tokens.mean_sq[block] / traced**2
    return spec.macs * tokens.mean[block] / traced


def _row(
    spec: LayerSpec,
    structure: Structure,
    tokens: TokenCounts,
    density: Mapping[str, float],
    activity: Activity | None,
    order: str,
    e_mac: float,
    e_ac: float,
) -> dict:
    dense = _dense_macs(spec, structure, tokens, order)
    weighted = spec.weight_key is not None
    dens = density.get(spec.weight_key, 1.0) if weighted else 1.0
    nonzero = dense * dens  # weight sparsity never applies to the spike x spike products
    shown_tokens = tokens.mean[spec.token_block] if spec.token_block is not None else spec.tokens
    row = {
        "layer": spec.name,
        "kind": spec.kind,
        "block": spec.block,
        "tokens": _number(shown_tokens),
        "op": _static_op(spec),
        "weight_sparsity": round(1 - dens, 6) if weighted else None,
        "dense_macs": round(dense),
        "nonzero_macs": round(nonzero),
        "firing_rate": None,
        "sops": None,
        "energy_pj": None,
    }
    if activity is not None:
        _add_activity(row, spec, activity, e_mac, e_ac)
    return row


def _static_op(spec: LayerSpec) -> str:
    """`mask` for the masks of the linear attentions, `mac` for real-valued inputs known without data, else `ac`."""
    if spec.op is not None:
        return spec.op
    return "mac" if spec.analog_input or spec.kind == "selector" else "ac"


def _add_activity(row: dict, spec: LayerSpec, activity: Activity, e_mac: float, e_ac: float) -> None:
    if spec.op == "mask":  # a select between two spike maps: no accumulate, not priced
        row["energy_pj"] = 0.0
        return
    if spec.kind == "attn":
        row["sops"] = round(activity.attention[spec.name] / activity.images)
    else:
        stats = activity.layers[spec.name]
        image_input = spec.analog_input and spec.kind == "conv"  # pixels, not a rate
        if stats.firing_rate is not None and not image_input:
            row["firing_rate"] = round(stats.firing_rate, 6)
        # integer-valued inputs (spikes, spike counts) are accumulated; real-valued ones need multiplies. The image
        # conv, the head (pooled mean) and the selector (time-averaged) are MAC layers even if their input happens
        # to be integral (a silent model)
        row["op"] = "mac" if spec.analog_input or spec.kind == "selector" or not stats.integer else "ac"
        if row["op"] == "ac":
            row["sops"] = round(stats.acs / activity.images)
    row["energy_pj"] = e_mac * row["nonzero_macs"] if row["op"] == "mac" else e_ac * row["sops"]


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 3)


# ------------------------------------------------------------------------------------------------------ report
def check_whatif(keep, with_data: bool) -> None:
    """A --keep what-if counts gathered tokens without data; measured runs count what the selectors really kept."""
    if keep is not None and with_data:
        raise SpkpruneError(
            "--keep is a what-if without data; with --dataset the tokens the model's selectors keep are measured "
            "(attach a selector with select-tokens, or drop --keep)"
        )


def count_operations(
    model: nn.Module,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    keep: float | list[float] | None = None,
    batches: Iterable | None = None,
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
    attention_order: str = "qk_v",
    dataset: str | None = None,
    num_batches: int | None = None,
    structure: Structure | None = None,
) -> dict:
    """The flops report of `model` per image: rows per layer and totals (see docs/counting.md).

    `keep` is a what-if: tokens gathered with cumulative keep ratios (one rho or one ratio per location) instead of
    the model's own selectors. `batches` (input tensors or `(inputs, targets)`) adds firing rates, exact SOPs and
    energy, and then the token counts are the ones measured. `attention_order` `qk_v` is the papers' (Q.K^T).V
    convention (n^2*D each); `q_kv` counts Q.(K^T.V) (n*D*d_h each). `structure` reuses an earlier
    `trace_structure(model)` (the trace is the slow part when one model is counted several times).
    """
    if attention_order not in ATTENTION_ORDERS:
        raise SpkpruneError(f"unknown attention order {attention_order!r}; choose one of {', '.join(ATTENTION_ORDERS)}")
    for name, value in (("--e-mac", e_mac), ("--e-ac", e_ac)):
        if not value >= 0:
            raise SpkpruneError(f"{name} must be a non-negative energy in pJ, got {value}")
    check_whatif(keep, batches is not None)
    structure = structure or trace_structure(model)
    density = weight_density(model, masks)
    ratios = None
    activity = measure_activity(model, batches, masks, structure) if batches is not None else None
    if activity is not None:
        if activity.images == 0:
            raise SpkpruneError("the data gave no images to measure: check --dataset / --batches")
        depth = structure.depth
        tokens = TokenCounts(
            [activity.mean_tokens(b) for b in range(depth)], [activity.mean_tokens_sq(b) for b in range(depth)]
        )
    elif keep is not None:
        ratios, counts = whatif_tokens(model, keep, structure)
        tokens = TokenCounts.fixed(counts)
    else:
        tokens = TokenCounts.fixed(configured_tokens(model, structure))
    rows = [_row(s, structure, tokens, density, activity, attention_order, e_mac, e_ac) for s in structure.layers]
    used, nonzero_params = parameter_counts(model, density)
    return {
        "model": structure.model_name,
        "rows": rows,
        "totals": _totals(rows, structure, tokens, activity is not None),
        "params_used": used,
        "params_nonzero": nonzero_params,
        "timesteps": structure.timesteps,
        "num_tokens": structure.num_tokens,
        "tokens_per_block": [_number(n) for n in tokens.mean],
        "blocks": structure.blocks,
        "keep": ratios,
        "selectors": structure.selector_locations,
        "attention_order": attention_order,
        "e_mac": e_mac,
        "e_ac": e_ac,
        "dataset": dataset,
        "batches": num_batches,
        "images": activity.images if activity is not None else None,
        "notes": [] if activity is not None else [NOTE_NEEDS_DATA],
    }


def _totals(rows: list[dict], structure: Structure, tokens: TokenCounts, measured: bool) -> dict:
    totals = {
        "dense_macs": sum(r["dense_macs"] for r in rows),
        "nonzero_macs": sum(r["nonzero_macs"] for r in rows),
        "macs": None,
        "sops": None,
        "energy_pj": None,
        "energy_mj": None,
        "lif_updates": round(lif_updates(structure, tokens)),
    }
    if measured:
        totals["macs"] = sum(r["nonzero_macs"] for r in rows if r["op"] == "mac")
        totals["sops"] = sum(r["sops"] for r in rows if r["op"] == "ac")
        totals["energy_pj"] = round(sum(r["energy_pj"] for r in rows), 3)
        totals["energy_mj"] = totals["energy_pj"] * 1e-9
    return totals


def lif_updates(structure: Structure, tokens: TokenCounts) -> float:
    """Membrane updates per image (neurons x time steps), with the block neurons scaled to the tokens kept."""
    total = 0.0
    for updates, block in structure.lif_updates.values():
        total += updates if block is None else updates * tokens.mean[block] / structure.traced_tokens[block]
    return total


# ------------------------------------------------------------------------------------------------- aggregation
def rows_by_block(rows: list[dict]) -> list[dict]:
    """Rows summed per block (sps, block.0, ..., selector.i, head; QKFormer: patch_embed1, stage1.0, ...), in forward
    order. A group's tokens are the most its rows see (a patch embedding's output positions at full resolution)."""
    blocks: dict[str, dict] = {}
    for row in rows:
        agg = blocks.setdefault(
            row["block"], {"block": row["block"], "layers": 0, "tokens": row["tokens"], **{f: None for f in SUM_FIELDS}}
        )
        agg["layers"] += 1
        for name in SUM_FIELDS:  # None (not measured, or not an AC layer) adds nothing; all None stays None
            if row[name] is not None:
                agg[name] = (agg[name] or 0) + row[name]
    for name, agg in blocks.items():
        agg["tokens"] = max(r["tokens"] for r in rows if r["block"] == name)
    return list(blocks.values())


# ------------------------------------------------------------------------------------------------------- store
def attach_report(store, ref: str, report: dict) -> None:
    """Store `report` with the checkpoint, in its `meta["flops"]` (export puts it in the model card)."""
    store.update_meta(ref, "flops", report)
