"""The settings of an IMP run, declared once: what decides its results (`ImpSettings`, stored in every round and
compared on re-run) and the rest of the `spkprune imp` command (`ImpCommandSettings`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, field_validator, model_validator

from spkprune.errors import SpkpruneError
from spkprune.pruning import masks as M
from spkprune.pruning.structured import IMPORTANCES
from spkprune.pruning.structures import KINDS
from spkprune.settings import NonNegativeInt, Settings, option, split_list
from spkprune.training.config import Epochs, TimeSteps

DEFAULT_TARGET = 0.9
DEFAULT_ROUNDS = 10
DEFAULT_RECALIBRATE_BATCHES = 20
CONTROLS = ("none", "random-reinit", "random-prune")
GRANULARITIES = ("weight", "channel")
ALLOCATIONS = ("uniform", "sensitivity")
_REWIND_RE = re.compile(r"^(init|none|epoch:(\d+)|iter:(\d+))$")
Fraction = Annotated[float, Field(gt=0, lt=1)]
Globs = Annotated[tuple[str, ...], BeforeValidator(split_list)]
Structures = Annotated[tuple[str, ...], BeforeValidator(split_list)]  # names checked below (choices: KINDS)
# Fields added after stores began recording the run identity: part of it only when they differ from their defaults.
_LATER_FIELDS = ("granularity", "structures", "importance", "one_shot", "recalibrate_batches", "finetune_epochs",
                 "allocation")


class ImpSettings(Settings):
    """Everything that decides an IMP run's results. Give `target` or `rate` (neither: target 0.9)."""

    rounds: Optional[Epochs] = option(None, f"Pruning rounds N (the ticket is NAME@round-N; default {DEFAULT_ROUNDS}, "
                                      "with --one-shot 1).")
    target: Optional[Fraction] = option(None, f"Sparsity of the eligible weights after round N (with --granularity "
                                        f"channel: the fraction of structures removed; default {DEFAULT_TARGET}).")
    rate: Optional[Fraction] = option(None, "Fraction of the surviving weights pruned per round (instead of "
                                      "--target).")
    scope: Literal[M.SCOPES] = option("global", "global: one ranking over all weights; layerwise: per tensor.")
    exclude: Globs = option((), "Glob over state_dict keys never pruned (repeatable), e.g. 'head.weight'.",
                            repeat=True)
    rewind: str = option("init", "Rewind point: init, epoch:K or iter:K of the dense run, or none (each round "
                         "continues from the weights the round before ended with: structured fine-tuning).")
    epochs_per_round: Optional[Epochs] = option(None, "Retraining epochs per round (default: as many as the dense "
                                                "run).")
    search_timesteps: Optional[TimeSteps] = option(None, "Early-time ticket: search masks at T' time steps, retrain "
                                                   "the last round at full T.")
    seed: Optional[int] = option(None, "Seed of the retraining (default: the dense run's).")
    granularity: Literal[GRANULARITIES] = option("weight", "What a round prunes: single weights (weight) or whole "
                                                 "heads and channels (channel).")
    structures: Structures = option(KINDS, "With --granularity channel: which structures, comma-separated: heads "
                                    "(attention heads), mlp (MLP hidden channels), stem (patch-splitting channels).",
                                    split=True)
    importance: Literal[IMPORTANCES] = option("l2", "With --granularity channel: rank structures by the norm of "
                                              "their weights (l2) or by their BatchNorm scales (bn).")
    allocation: Literal[ALLOCATIONS] = option("uniform", "How the sparsity is spread over the layers: uniform (by "
                                              "--scope) or sensitivity (per-layer targets from the stored scan of "
                                              "`spkprune sensitivity REF`, least predicted damage; weight granularity).")
    one_shot: bool = option(False, "One-shot pruning: one round straight to --target from the source's weights, no "
                            "rewind and no retraining (BatchNorm recalibrated; --finetune-epochs to fine-tune).")
    recalibrate_batches: NonNegativeInt = option(DEFAULT_RECALIBRATE_BATCHES, "With --one-shot: re-estimate the "
                                                 "BatchNorm statistics on N training batches before evaluating (0: off).")
    finetune_epochs: NonNegativeInt = option(0, "With --one-shot: fine-tune the pruned weights for K epochs (pruned "
                                             "weights stay zero) before recalibrating.")

    @model_validator(mode="before")
    @classmethod
    def _target_or_rate(cls, values):
        if isinstance(values, dict) and values.get("target") is None and values.get("rate") is None:
            values = {**values, "target": DEFAULT_TARGET}
        return values

    @model_validator(mode="before")
    @classmethod
    def _one_shot_defaults(cls, values):
        """One round, and no rewind (`init`, the default, becomes `none`) for a one-shot run; 10 rounds otherwise."""
        if not isinstance(values, dict):
            return values
        one_shot = _is_true(values.get("one_shot", False))
        if values.get("rounds") is None:
            values = {**values, "rounds": 1 if one_shot else DEFAULT_ROUNDS}
        if one_shot and values.get("rewind", "init") == "init":
            values = {**values, "rewind": "none"}
        return values

    @field_validator("rewind")
    @classmethod
    def _rewind_point(cls, spec: str) -> str:
        match = _REWIND_RE.match(spec)
        if not match or (":" in spec and int(spec.split(":")[1]) < 1):
            raise ValueError("must be init, epoch:K or iter:K with K >= 1, or none")
        return spec

    @field_validator("structures")
    @classmethod
    def _some_structures(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        if not kinds or any(kind not in KINDS for kind in kinds):
            raise ValueError(f"must name one or more of {', '.join(KINDS)}")
        return tuple(kind for kind in KINDS if kind in kinds)  # one order, whatever the order given

    @model_validator(mode="after")
    def _one_schedule(self):
        if self.target is not None and self.rate is not None:
            raise ValueError("give exactly one of target and rate")
        return self

    @model_validator(mode="after")
    def _allocation_of_weights(self):
        if self.allocation == "sensitivity" and (self.granularity != "weight" or self.scope != "global"):
            raise ValueError("allocation sensitivity sets each layer's sparsity itself: it applies with granularity "
                             "weight and scope global")
        return self

    @model_validator(mode="after")
    def _structures_need_channels(self):
        fields = ImpSettings.model_fields
        changed = [name for name in ("structures", "importance") if getattr(self, name) != fields[name].default]
        if changed and self.granularity != "channel":
            raise ValueError(f"{' and '.join(changed)} only apply with granularity channel")
        return self

    @model_validator(mode="after")
    def _one_shot_alone(self):
        fields = ImpSettings.model_fields
        if not self.one_shot:
            changed = [name for name in ("recalibrate_batches", "finetune_epochs")
                       if getattr(self, name) != fields[name].default]
            if changed:
                raise ValueError(f"{' and '.join(changed)} only {'apply' if len(changed) > 1 else 'applies'} with "
                                 "one_shot")
            return self
        if self.rounds != 1:
            raise ValueError(f"one_shot prunes in a single round; rounds must be 1 (got {self.rounds})")
        if self.rate is not None:
            raise ValueError("one_shot prunes straight to a target; give target, not rate")
        if self.rewind != "none":
            raise ValueError(f"one_shot starts from the source's own weights; rewind {self.rewind} does not apply")
        if self.epochs_per_round is not None:
            raise ValueError("epochs_per_round does not apply with one_shot; its fine-tune is finetune_epochs")
        if self.search_timesteps is not None:
            raise ValueError("search_timesteps does not apply with one_shot; its one round is at the model's T")
        return self

    def validate(self) -> "ImpSettings":
        return self  # validated on construction

    def levels(self) -> list[float]:
        return M.sparsity_schedule(self.rounds, target=self.target, rate=self.rate)

    def to_dict(self) -> dict:
        """The run's identity as stored in every round. Older stores recorded rounds, target, rate, scope, exclude,
        rewind, epochs_per_round, search_timesteps and seed; a later field joins only when it is not at its default,
        so that a run those stores hold still compares equal."""
        data = {name: getattr(self, name) for name in ImpSettings.model_fields if name not in _LATER_FIELDS}
        data["exclude"] = list(self.exclude)
        for name in _LATER_FIELDS:
            value = getattr(self, name)
            if value != ImpSettings.model_fields[name].default:
                data[name] = list(value) if isinstance(value, tuple) else value
        return data


def _is_true(value) -> bool:
    """A bool as the field will read it (a malformed value is refused by the field itself afterwards)."""
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return False


class ImpCommandSettings(ImpSettings):
    """`spkprune imp`: the run's settings, where it starts and where its rounds go."""

    ref: str = option(..., "Trained dense checkpoint NAME[@TAG] (its NAME@init is the rewind point).", argument=True,
                      recipe="from", ref=True)
    name: str = option(..., "Name of the run: rounds are saved as NAME@round-0 ... NAME@round-N.", identity=False)
    control: Literal[CONTROLS] = option("none", "Also run a control: random-reinit (same masks, fresh init) or "
                                        "random-prune (random masks, same per-layer counts).")
    resume: bool = option(False, "Require an existing run NAME and continue it.", recipe=None)
    plot: Optional[Path] = option(None, "Where to write the accuracy-vs-sparsity PNG (default "
                                  "STORE/plots/NAME-imp.png).", identity=False)

    def run_settings(self) -> ImpSettings:
        return ImpSettings(**{name: getattr(self, name) for name in ImpSettings.model_fields})


def parse_rewind(spec: str) -> tuple[str, int]:
    """`init` -> ("init", 0); `none` -> ("none", 0); `epoch:K` -> ("epoch", K); `iter:K` -> ("iter", K)."""
    match = _REWIND_RE.match(spec or "")
    if not match:
        raise SpkpruneError(f"invalid --rewind {spec!r}; use init, none, epoch:K or iter:K (K a whole number)")
    if spec in ("init", "none"):
        return spec, 0
    kind, value = spec.split(":")
    if int(value) < 1:
        raise SpkpruneError(f"--rewind {spec}: K must be at least 1 (use init for the initial weights)")
    return kind, int(value)
