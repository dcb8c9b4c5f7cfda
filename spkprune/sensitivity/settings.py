"""The settings of `spkprune sensitivity`, declared once (see spkprune.settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BeforeValidator, Field, field_validator

from spkprune.sensitivity.allocation import OVER
from spkprune.settings import NonNegativeInt, PositiveInt, Settings, option, split_list

DEFAULT_RATIOS = (0.5, 0.8, 0.9, 0.95)
Ratios = Annotated[tuple[Annotated[float, Field(gt=0, lt=1)], ...], BeforeValidator(split_list)]


class SensitivitySettings(Settings):
    """`spkprune sensitivity`: prune one unit at a time at several ratios and measure the top-1 it costs."""

    ref: str = option(..., "Trained checkpoint NAME[@TAG] in the store (the scan is stored beside it).",
                      argument=True, recipe="from", ref=True)
    ratios: Ratios = option(DEFAULT_RATIOS, "Fractions pruned, comma-separated, each strictly between 0 and 1: of "
                            "a layer's weights, of a structure layer's heads or channels, or of the tokens at a "
                            "selector location.", split=True)
    over: Literal[OVER] = option("layers", "What is pruned one at a time: layers (each prunable weight tensor, by "
                                 "magnitude), structures (the heads / MLP channels / stem channels of one layer, by "
                                 "importance) or locations (a firing-rate token selector before one block).")
    recalibrate: NonNegativeInt = option(0, "Training batches to re-estimate BatchNorm statistics on before each "
                                         "evaluation (0: none).")
    samples: Optional[PositiveInt] = option(None, "Test images to evaluate on (default: the whole test split).")
    dataset: Optional[str] = option(None, "Data set (default: the one REF was trained on).")
    data_dir: Optional[str] = option(None, "Where the data set lives (not needed for digits).")
    plot: Optional[Path] = option(None, "Where to write the drop heat map PNG (default "
                                  "STORE/plots/NAME-sensitivity-OVER.png).", identity=False)

    @field_validator("ratios")
    @classmethod
    def _some_ratios(cls, ratios: tuple[float, ...]) -> tuple[float, ...]:
        if not ratios:
            raise ValueError("give one or more ratios strictly between 0 and 1, e.g. 0.5,0.8,0.9")
        return tuple(sorted(set(ratios)))
