"""What a recipe may contain: the top-level keys, and for each stage type the settings of the library call it
makes. A stage's options are its settings model's fields (spkprune.settings), so recipes, the CLI and the library
share one declaration of every option: its type, bounds, choices, default and help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic.fields import FieldInfo

from spkprune.bench.settings import BenchSettings
from spkprune.compact.settings import CompactSettings
from spkprune.counting.settings import FlopsSettings
from spkprune.export.settings import ExportSettings
from spkprune.pruning.settings import ImpCommandSettings
from spkprune.recipes import stages
from spkprune.selection.settings import SelectTokensSettings
from spkprune.settings import Settings, field_meta, option, recipe_key
from spkprune.training.settings import EvaluateSettings, TrainSettings


@dataclass(frozen=True)
class StageOption:
    """One option of a stage: the settings field behind a recipe key."""

    field: str  # the settings field name (`ref` for the recipe key `from`)
    info: FieldInfo
    is_ref: bool  # a checkpoint reference: recipes link it to an earlier stage
    identity: bool  # part of the stage's identity hash

    @property
    def help(self) -> str:
        return self.info.description or ""


@dataclass(frozen=True)
class StageType:
    """A stage type: the settings its library call takes, the call itself, and where its result lands."""

    name: str
    settings: type[Settings]
    run: Callable[..., dict]  # stages.run_*(store, settings, progress=..., log=...) -> the stage's result
    summary: str
    inherits: dict[str, str] = field(default_factory=dict)  # option -> top-level key it defaults to
    inherit_unless: dict[str, str] = field(default_factory=dict)  # option -> option that, when set, stops inheriting
    resume_drops: tuple[str, ...] = ()  # options a resumed run ignores (it reuses the run's own)
    output: str = "none"  # "checkpoint" (NAME@main), "rounds" (NAME@round-K), "folder" (out), "none"
    reads_presets: bool = False  # a reference may be a preset name (a freshly initialised model)

    @property
    def options(self) -> dict[str, StageOption]:
        """Recipe key -> option, in the settings' declaration order."""
        found = {}
        for name, info in self.settings.model_fields.items():
            key = recipe_key(self.settings, name)
            if key is not None:
                meta = field_meta(self.settings, name)
                found[key] = StageOption(name, info, meta["ref"], meta["identity"])
        return found

    @property
    def runner_sets(self) -> tuple[str, ...]:
        """Settings the runner decides itself (resume, overwrite), never written in a recipe."""
        return tuple(name for name in self.settings.model_fields if recipe_key(self.settings, name) is None)

    @property
    def positional(self) -> Optional[str]:
        """The option naming the stage's input model (`from`), if it has one."""
        return "from" if "from" in self.options else None

    @property
    def resumable(self) -> bool:
        return "resume" in self.settings.model_fields

    def build(self, options: dict[str, Any], **runner: Any) -> Settings:
        """The stage's settings from its recipe options and the runner's own (resume, overwrite)."""
        values = {self.options[key].field: value for key, value in options.items() if value is not None}
        values.update({key: value for key, value in runner.items() if key in self.runner_sets})
        return self.settings.parse(values)


STAGE_TYPES: dict[str, StageType] = {
    "train": StageType(
        "train", TrainSettings, stages.run_train,
        summary="train a model from scratch (or from `init`), saving NAME@init, NAME@epoch-K and NAME@main",
        inherits={"arch": "model", "dataset": "data.dataset", "data_dir": "data.data_dir", "seed": "seed"},
        resume_drops=("arch", "init"), output="checkpoint",
    ),
    "imp": StageType(
        "imp", ImpCommandSettings, stages.run_imp,
        summary="iterative magnitude pruning with rewinding: NAME@round-0 (the input) .. NAME@round-N, resumable",
        inherits={"seed": "seed"}, output="rounds",
    ),
    "select-tokens": StageType(
        "select-tokens", SelectTokensSettings, stages.run_select_tokens,
        summary="attach the spiking token selector and fine-tune it (CE + keep-ratio MSE + KL from `teacher`)",
        inherits={"seed": "seed"}, output="checkpoint",
    ),
    "compact": StageType(
        "compact", CompactSettings, stages.run_compact,
        summary="cut out the heads and channels the masks removed: a smaller dense model, the same outputs",
        output="checkpoint",
    ),
    "evaluate": StageType(
        "evaluate", EvaluateSettings, stages.run_evaluate,
        summary="top-1, top-5, loss and firing rates on the test split",
        inherits={"dataset": "data.dataset", "data_dir": "data.data_dir"},
    ),
    "flops": StageType(
        "flops", FlopsSettings, stages.run_flops,
        summary="dense MACs, nonzero-weight MACs, SOPs and energy, per layer and in total",
        inherits={"dataset": "data.dataset", "data_dir": "data.data_dir"},
        inherit_unless={"dataset": "keep", "data_dir": "keep"}, reads_presets=True,
    ),
    "bench": StageType(
        "bench", BenchSettings, stages.run_bench,
        summary="measured latency, throughput and peak memory of `refs`, speed-ups against the first",
        reads_presets=True,
    ),
    "export": StageType(
        "export", ExportSettings, stages.run_export,
        summary="a Hub-ready folder (safetensors, config.json, model card), optionally pushed to the Hub",
        output="folder",
    ),
}


class RecipeTop(Settings):
    """The top-level keys of a recipe (besides `vars`, `data` and `stages`)."""

    name: Optional[str] = option(None, "Run name; artifact names default to NAME-STAGE (default: the file's stem).")
    description: Optional[str] = option(None, "Free text, shown by --dry-run.")
    model: Optional[str] = option(None, "Model preset, the default `arch` of train stages.")
    seed: int = option(0, "Default seed of every stage that has one.")
    store: Optional[str] = option(None, "Store directory (overridden by --store and $SPKPRUNE_STORE).")


class RecipeData(Settings):
    """The `data` section of a recipe."""

    dataset: Optional[str] = option(None, "Data set name (default: the model preset's).")
    data_dir: Optional[str] = option(None, "Where the data set lives (not needed for digits).")


TOP_LEVEL = tuple(RecipeTop.model_fields)
DATA_KEYS = tuple(RecipeData.model_fields)
SECTION_KEYS = ("vars", "data", "stages")


def stage_type(name: str) -> StageType:
    return STAGE_TYPES[name]
