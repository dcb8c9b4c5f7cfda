"""The settings of token selection, declared once: what is attached and how the loss weighs it
(`SelectionConfig`, stored with the result) and the rest of `spkprune select-tokens` (`SelectTokensSettings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BeforeValidator, Field

from spkprune.counting.settings import KEEP_HELP, KeepRatio
from spkprune.models.selector import ACTIONS, SCORERS
from spkprune.selection.loss import DISTILL_WEIGHT, RATIO_WEIGHT
from spkprune.settings import NonNegativeFloat, NonNegativeInt, Settings, option, split_list
from spkprune.training.config import BatchSize, LearningRate

INITS = ("firing-rate", "random")
KEEP_ALLOCATIONS = ("uniform", "sensitivity")
# Learning-rate factor of a learned selector's MLP: a warm-started MLP already ranks tokens well and the
# straight-through gradient is noisy, so it moves at a tenth of the backbone's rate; from the paper's random
# initialisation it learns at the full rate.
SELECTOR_LR_SCALE = {"firing-rate": 0.1, "random": 1.0}
Blocks = Annotated[list[Annotated[int, Field(ge=0)]], BeforeValidator(split_list)]


class SelectionConfig(Settings):
    """What to attach and how to weigh the loss. `keep` is one ratio rho (cumulative rho, rho^2, ... per location)
    or one cumulative ratio per location; `locations` defaults to every block but the first."""

    keep: KeepRatio = option(0.7, KEEP_HELP)
    locations: Optional[Blocks] = option(None, "Blocks a selector sits before (default: all but the first, e.g. "
                                         "1,2,3 for 4 blocks).", split=True)
    scorer: Literal[SCORERS] = option("learned", "learned (the paper's MLP + Gumbel-softmax), firing-rate "
                                      "(training-free) or random (control).")
    action: Literal[ACTIONS] = option("drop", "What becomes of the tokens a selector does not keep: drop (they leave "
                                      "the model) or skip (TP-Spikformer: they stop being updated and are carried "
                                      "to the final pooling; training-free, weightless scorers only).")
    ratio_weight: NonNegativeFloat = option(RATIO_WEIGHT, "Weight of the keep-ratio MSE (divided by the number of "
                                            "selectors, as in the reference code).")
    distill_weight: NonNegativeFloat = option(DISTILL_WEIGHT, "Weight of the KL distillation from the teacher (0 "
                                              "turns it off).")
    init: Literal[INITS] = option("firing-rate", "Learned scorer's start: firing-rate (its MLP first ranks tokens "
                                  "by firing rate, calibrated to the keep ratio) or random (the paper's init).")
    selector_lr_scale: Optional[LearningRate] = option(None, "Learning-rate factor of the learned selector's MLP "
                                                       "(default 0.1 with --init firing-rate, 1 with random).")

    def validate(self) -> "SelectionConfig":
        return self  # validated on construction

    def lr_scales(self) -> dict[str, float] | None:
        """`TrainConfig.lr_scales` for the fine-tuning: the learned MLP's factor, None for weightless scorers."""
        if self.scorer != "learned":
            return None
        scale = SELECTOR_LR_SCALE[self.init] if self.selector_lr_scale is None else self.selector_lr_scale
        return {"token_selectors.": float(scale)}

    def selector(self) -> dict:
        config = {"keep": self.keep, "scorer": self.scorer}
        if self.action != "drop":  # drop, the default, is not written: stored configurations read as before
            config["action"] = self.action
        if self.locations:
            config["locations"] = list(self.locations)
        return config

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in SelectionConfig.model_fields}


class SelectTokensSettings(SelectionConfig):
    """`spkprune select-tokens`: attach the spiking token selector and fine-tune it (or only analyse firing)."""

    ref: str = option(..., "Checkpoint to start from: NAME[@TAG], a .safetensors file, a folder or hf://.",
                      argument=True, recipe="from", ref=True)
    name: Optional[str] = option(None, "Store the fine-tuned model as NAME (required unless --analyze).",
                                 identity=False)
    scorer: Optional[Literal[SCORERS]] = option(None, "learned (the paper's MLP + Gumbel-softmax), firing-rate "
                                                "(training-free) or random (control). Default: learned; "
                                                "firing-rate with --action skip or --analyze without --name.")
    epochs: Optional[NonNegativeInt] = option(None, "Fine-tuning epochs (default 10, 0 with --action skip; 0 "
                                              "evaluates a firing-rate or random selector without fine-tuning).")
    lr: Optional[LearningRate] = option(None, "Peak learning rate (default: 0.2 x the checkpoint's training lr).")
    batch_size: Optional[BatchSize] = option(None, "Training batch size (default: the checkpoint's).")
    teacher: Optional[str] = option(None, "Frozen teacher for distillation (default: REF itself, without "
                                    "selectors).", ref=True)
    dataset: Optional[str] = option(None, "Data set (default: the one REF was trained on).")
    data_dir: Optional[str] = option(None, "Where the data set lives (not needed for digits).")
    seed: Optional[int] = option(None, "Random seed (default: the checkpoint's).")
    keep_allocation: Literal[KEEP_ALLOCATIONS] = option("uniform", "uniform: --keep as given; sensitivity: as many "
                                                        "tokens dropped in all as --keep drops, spread over the "
                                                        "locations by the stored scan of `spkprune sensitivity REF "
                                                        "--over locations` (least predicted damage).")
    analyze: bool = option(False, "Write firing-rate and kept-token pictures (PNG) and the kept-vs-dropped table "
                           "to --out (of the NAME result, or of REF without --name).", flag="--analyze",
                           identity=False)
    out: Path = option(Path("token-analysis"), "Folder for the --analyze pictures.", identity=False)
    samples: BatchSize = option(512, "Test images the --analyze table averages over.", identity=False)
    overwrite: bool = option(False, "Replace NAME if it exists.", flag="--overwrite", recipe=None)

    def selection(self) -> SelectionConfig:
        values = {name: getattr(self, name) for name in SelectionConfig.model_fields}
        default = "firing-rate" if self.action == "skip" else "learned"
        return SelectionConfig(**{**values, "scorer": self.scorer or default})

    def train_overrides(self) -> dict:
        return {"lr": self.lr, "batch_size": self.batch_size, "dataset": self.dataset, "data_dir": self.data_dir,
                "seed": self.seed}
