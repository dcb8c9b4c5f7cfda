"""The settings of `spkprune flops report`, declared once, and the keep-ratio type token selection shares."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BeforeValidator

from spkprune.settings import NonNegativeFloat, PositiveInt, Settings, option, split_list

KEEP_HELP = ("Keep ratio rho (cumulative rho, rho^2, rho^3 of the tokens at the selector locations) or one "
             "cumulative ratio per location: 0.7 or 0.9,0.7,0.5.")


def keep_ratios(value):
    """`0.7` / `"0.7"` -> 0.7 (cumulative rho, rho^2, ...); `"0.9,0.7"` or [0.9, 0.7] -> one ratio per location."""
    parts = split_list(value)
    items = parts if isinstance(parts, list) else [parts]
    try:
        ratios = [float(item) for item in items if not isinstance(item, bool)]
    except (TypeError, ValueError):
        raise ValueError("must be a ratio or comma-separated ratios, e.g. 0.7 or 0.9,0.7,0.5") from None
    if not ratios or len(ratios) != len(items) or not all(0 < ratio <= 1 for ratio in ratios):
        raise ValueError("each keep ratio must lie in (0, 1], e.g. 0.7 or 0.9,0.7,0.5")
    return ratios[0] if len(ratios) == 1 else ratios


KeepRatio = Annotated[Union[float, list[float]], BeforeValidator(keep_ratios)]


class FlopsSettings(Settings):
    """`spkprune flops report`: dense MACs, nonzero-weight MACs, SOPs and energy per layer and in total."""

    ref: str = option(..., "A preset name or a checkpoint reference.", argument=True, recipe="from", ref=True)
    keep: Optional[KeepRatio] = option(None, "What-if token keep ratio for a model without selectors. " + KEEP_HELP)
    dataset: Optional[str] = option(None, "Measure firing rates, SOPs and energy on this data set.")
    data_dir: Optional[str] = option(None, "Root of the data set (not needed for digits).")
    batches: PositiveInt = option(4, "Test batches to measure on.")
    batch_size: PositiveInt = option(32, "Images per batch.")
    e_mac: NonNegativeFloat = option(4.6, "Energy per MAC in pJ (45 nm fp32).")
    e_ac: NonNegativeFloat = option(0.9, "Energy per accumulate in pJ (45 nm fp32).")
    by: Literal["layer", "block"] = option("layer", "Rows per layer or per block.", recipe=None)
    save: Optional[bool] = option(None, "Store the report with the checkpoint (default: on for store references).",
                                  flag="--save/--no-save", recipe=None)
