"""What a recipe may contain: the top-level keys and, for each stage type, the options of its CLI command.

This module is the single source of truth for stage options. Each `StageType` names the CLI command it runs and
lists that command's options under their Python names (`epochs_per_round` for `--epochs-per-round`); a test compares
these names with the Typer commands' parameters so the two cannot drift apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

# Value kinds. "ref" is a checkpoint reference: an earlier stage's name (optionally STAGE@TAG) or an external
# reference (NAME@TAG in the store, a path, hf://ORG/REPO).
KINDS = ("str", "int", "float", "bool", "ref", "path", "choice", "int_list", "str_list")


@dataclass(frozen=True)
class Opt:
    """One option of a stage: its value kind, default and how it reaches the command line."""

    kind: str
    default: Any = None
    choices: tuple = ()
    help: str = ""
    required: bool = False
    identity: bool = True  # part of the stage's identity hash (False for output locations and display options)
    minimum: float | None = None
    maximum: float | None = None
    repeat: bool = False  # a list option given as a repeated flag (--exclude a --exclude b), not comma-joined
    pattern: str | None = None  # a regular expression a string value must match (for `rewind`)

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind

    def expected(self) -> str:
        """How to describe a valid value in an error message."""
        text = {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "ref": "a stage name (STAGE or STAGE@TAG) or a reference (NAME@TAG, a path, hf://ORG/REPO)",
            "path": "a path",
            "choice": "one of " + ", ".join(map(str, self.choices)),
            "int_list": "a list of integers (or a comma-separated string)",
            "str_list": "a list of strings",
        }[self.kind]
        if self.minimum is not None and self.maximum is not None:
            text += f" in [{self.minimum:g}, {self.maximum:g}]"
        elif self.minimum is not None:
            text += f" >= {self.minimum:g}"
        if self.pattern:
            text += f" matching {self.pattern}"
        return text


@dataclass(frozen=True)
class StageType:
    """A stage type: the CLI command it runs, its options, and where its result lands."""

    name: str
    command: tuple[str, ...]  # ("flops", "report") for a subcommand of a group
    summary: str
    options: dict[str, Opt]
    positional: str | None = "from"  # the option passed as the command's positional REF argument
    inherits: dict[str, str] = field(default_factory=dict)  # option -> top-level key it defaults to
    inherit_unless: dict[str, str] = field(default_factory=dict)  # option -> option that, when set, stops inheriting
    resume_drops: tuple[str, ...] = ()  # options the command refuses together with --resume (it reuses the run's own)
    managed: tuple[str, ...] = ()  # CLI options the runner sets itself (never written in a recipe)
    output: str = "none"  # "checkpoint" (NAME@main), "rounds" (NAME@round-K), "folder" (out), "none"


def _int(default=None, minimum=None, help="", identity=True):
    return Opt("int", default, minimum=minimum, help=help, identity=identity)


def _float(default=None, minimum=None, maximum=None, help=""):
    return Opt("float", default, minimum=minimum, maximum=maximum, help=help)


DATASETS_HELP = "data set name (digits, cifar10, cifar100, cifar10-dvs, dvs128-gesture)"

STAGE_TYPES: dict[str, StageType] = {
    "train": StageType(
        name="train",
        command=("train",),
        summary="train a model from scratch (or from `init`), saving NAME@init, NAME@epoch-K and NAME@main",
        positional=None,
        inherits={"arch": "model", "dataset": "data.dataset", "data_dir": "data.data_dir", "seed": "seed"},
        managed=("resume", "format", "progress"),
        resume_drops=("arch", "init"),
        output="checkpoint",
        options={
            "arch": Opt("str", help="model preset (default: the recipe's `model`)"),
            "dataset": Opt("str", help=DATASETS_HELP + " (default: the recipe's data.dataset)"),
            "data_dir": Opt("path", help="where the data set lives (default: the recipe's data.data_dir)"),
            "name": Opt("str", help="artifact name (default: RECIPE-STAGE)", identity=False),
            "epochs": _int(minimum=1, help="training epochs (without cooldown)"),
            "batch_size": _int(minimum=1),
            "lr": _float(minimum=0),
            "timesteps": _int(minimum=1, help="simulation time steps T"),
            "seed": _int(help="random seed (default: the recipe's seed)"),
            "init": Opt("ref", help="start from these weights (and masks) instead of a fresh initialisation"),
            "keep_epochs": Opt("int_list", help="epoch checkpoints kept for late rewinding (CLI default 1,2,3)"),
            "save_iter": Opt("int_list", repeat=True, help="also save NAME@iter-K after optimiser step K (for rewind iter:K)"),
            "limit_batches": _int(minimum=1, help="train on only this many batches per epoch (smoke tests)"),
            "workers": _int(minimum=0, identity=False, help="DataLoader worker processes"),
            "threads": _int(minimum=1, identity=False, help="CPU threads per process (1 is fastest for tiny models)"),
        },
    ),
    "imp": StageType(
        name="imp",
        command=("imp",),
        summary="iterative magnitude pruning with rewinding: NAME@round-0 (the input) .. NAME@round-N, resumable",
        inherits={"seed": "seed"},
        managed=("resume", "format", "progress"),
        output="rounds",
        options={
            "from": Opt("ref", help="the trained dense model (its NAME@init is the rewind point)"),
            "name": Opt("str", help="artifact name (default: RECIPE-STAGE)", identity=False),
            "rounds": _int(default=10, minimum=1, help="pruning rounds N (the ticket is NAME@round-N)"),
            "target": _float(minimum=0, maximum=1, help="sparsity of the eligible weights after round N (CLI: 0.9)"),
            "rate": _float(minimum=0, maximum=1, help="fraction of surviving weights pruned per round (instead of target)"),
            "scope": Opt("choice", choices=("global", "layerwise")),
            "exclude": Opt("str_list", repeat=True, help="glob patterns of state_dict keys never pruned"),
            "rewind": Opt("str", pattern=r"^(init|epoch:\d+|iter:\d+)$", help="rewind point: init, epoch:K or iter:K"),
            "epochs_per_round": _int(minimum=1, help="retraining epochs per round (default: the dense run's)"),
            "control": Opt("choice", choices=("none", "random-reinit", "random-prune")),
            "search_timesteps": _int(minimum=1, help="early-time ticket: search masks at T' time steps"),
            "seed": _int(help="seed of the retraining (default: the recipe's seed)"),
            "plot": Opt("path", identity=False, help="accuracy-vs-sparsity PNG (default STORE/plots/NAME-imp.png)"),
        },
    ),
    "select-tokens": StageType(
        name="select-tokens",
        command=("select-tokens",),
        summary="attach the spiking token selector and fine-tune it (CE + keep-ratio MSE + KL from `teacher`)",
        inherits={"seed": "seed"},
        managed=("format", "overwrite"),
        output="checkpoint",
        options={
            "from": Opt("ref", help="the model that receives the selector"),
            "name": Opt("str", help="artifact name (default: RECIPE-STAGE)", identity=False),
            "keep": _float(minimum=0, maximum=1, help="keep ratio rho (cumulative rho, rho^2, ... of the tokens)"),
            "locations": Opt("int_list", help="blocks a selector sits before (default: all but the first)"),
            "scorer": Opt("choice", choices=("learned", "firing-rate", "random")),
            "epochs": _int(minimum=0, help="fine-tuning epochs (CLI default 10)"),
            "lr": _float(minimum=0, help="peak learning rate (default: 0.2 x the checkpoint's training lr)"),
            "batch_size": _int(minimum=1, help="training batch size (default: the checkpoint's)"),
            "teacher": Opt("ref", help="frozen distillation teacher (default: the input model)"),
            "ratio_weight": _float(minimum=0, help="weight of the keep-ratio MSE (CLI default 2.0)"),
            "distill_weight": _float(minimum=0, help="weight of the KL distillation (CLI default 0.5)"),
            "init": Opt("choice", choices=("firing-rate", "random"),
                        help="learned scorer's start: the firing-rate ranking (default) or the paper's random init"),
            "selector_lr_scale": _float(minimum=0, help="learning-rate factor of the learned selector's MLP "
                                        "(default 0.1 after a firing-rate start, 1 otherwise)"),
            "dataset": Opt("str", help="data set (default: the one the input was trained on)"),
            "data_dir": Opt("path", help="where the data set lives"),
            "seed": _int(help="random seed (default: the recipe's seed)"),
            "analyze": Opt("bool", identity=False, help="also write firing-rate and kept-token pictures (PNG)"),
            "out": Opt("path", identity=False, help="folder for the analyze pictures"),
            "samples": _int(minimum=1, identity=False, help="test images the analysis averages over"),
        },
    ),
    "evaluate": StageType(
        name="evaluate",
        command=("evaluate",),
        summary="top-1, top-5, loss and firing rates on the test split",
        inherits={"dataset": "data.dataset", "data_dir": "data.data_dir"},
        managed=("format",),
        options={
            "from": Opt("ref", help="the model to evaluate"),
            "dataset": Opt("str", help=DATASETS_HELP + " (default: the recipe's data.dataset)"),
            "data_dir": Opt("path", help="where the data set lives (default: the recipe's data.data_dir)"),
            "batch_size": _int(minimum=1, identity=False, help="evaluation batch size (CLI default 256)"),
        },
    ),
    "flops": StageType(
        name="flops",
        command=("flops", "report"),
        summary="dense MACs, nonzero-weight MACs, SOPs and energy, per layer and in total",
        inherits={"dataset": "data.dataset", "data_dir": "data.data_dir"},
        inherit_unless={"dataset": "keep", "data_dir": "keep"},
        managed=("format",),
        options={
            "from": Opt("ref", help="the model to count (a stage, a reference or a preset name)"),
            "keep": _float(minimum=0, maximum=1, help="token keep ratio to assume when the model has no selector"),
            "dataset": Opt("str", help="measure firing rates on this data set, needed for SOPs and energy (default: "
                           "the recipe's data.dataset unless `keep` is set)"),
            "data_dir": Opt("path", help="where the data set lives (default: the recipe's data.data_dir)"),
            "batches": _int(minimum=1, help="test batches to measure on (CLI default 4)"),
            "batch_size": _int(minimum=1, help="images per batch (CLI default 32)"),
            "e_mac": _float(minimum=0, help="energy per MAC in pJ (CLI default 4.6)"),
            "e_ac": _float(minimum=0, help="energy per accumulate in pJ (CLI default 0.9)"),
        },
    ),
    "export": StageType(
        name="export",
        command=("export",),
        summary="a Hub-ready folder (safetensors, config.json, model card), optionally pushed to the Hub",
        output="folder",
        managed=("overwrite",),
        options={
            "from": Opt("ref", help="the model to export"),
            "out": Opt("path", help="output folder (default: exports/RECIPE-STAGE)", identity=False),
            "format": Opt("choice", choices=("dense", "sparse")),
            "dtype": Opt("choice", choices=("float32", "float16")),
            "push_to_hub": Opt("str", pattern=r"^[^/\s]+/[^/\s]+$", help="ORG/REPO to push to"),
            "revision": Opt("str", help="Hub branch or revision"),
            "private": Opt("bool", help="create the Hub repository as private"),
            "dry_run": Opt("bool", help="list what the push would upload; contact nothing"),
        },
    ),
}

# Top-level keys of a recipe (besides `stages` and `vars`, which have their own structure).
TOP_LEVEL: dict[str, Opt] = {
    "name": Opt("str", help="run name; artifact names default to NAME-STAGE (default: the file's stem)"),
    "description": Opt("str", help="free text, shown by --dry-run"),
    "model": Opt("str", help="model preset, the default `arch` of train stages"),
    "seed": Opt("int", default=0, help="default seed of every stage that has one"),
    "store": Opt("path", help="store directory (overridden by --store and $SPKPRUNE_STORE)"),
}
DATA_KEYS: dict[str, Opt] = {
    "dataset": Opt("str", help=DATASETS_HELP + " (default: the model preset's)"),
    "data_dir": Opt("path", help="where the data set lives (not needed for digits)"),
}
SECTION_KEYS = ("vars", "data", "stages")


class CoerceError(ValueError):
    """A value does not fit its option; the message says what was expected."""


def coerce(opt: Opt, value: Any) -> Any:
    """`value` converted to the option's kind (strings from the command line included), or CoerceError."""
    if value is None:
        return None
    convert: Callable[[Opt, Any], Any] = _CONVERTERS[opt.kind]
    try:
        result = convert(opt, value)
    except (TypeError, ValueError):
        raise CoerceError(f"expected {opt.expected()}, got {value!r}") from None
    _check_range(opt, result, value)
    return result


def _check_range(opt: Opt, result: Any, raw: Any) -> None:
    numbers = result if isinstance(result, list) else [result]
    for number in numbers:
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            low_ok = opt.minimum is None or number >= opt.minimum
            high_ok = opt.maximum is None or number <= opt.maximum
            if not (low_ok and high_ok):
                raise CoerceError(f"expected {opt.expected()}, got {raw!r}")
    if opt.pattern and isinstance(result, str) and not re.match(opt.pattern, result):
        raise CoerceError(f"expected {opt.expected()}, got {raw!r}")


def _to_int(opt: Opt, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ValueError


def _to_float(opt: Opt, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    number = float(value)  # YAML 1.1 reads `1e-3` as a string; float() takes it
    if math.isnan(number):
        raise ValueError
    return number


def _to_bool(opt: Opt, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError


def _to_str(opt: Opt, value: Any) -> str:
    if isinstance(value, (dict, list, bool)):
        raise TypeError
    if isinstance(value, float) and opt.kind != "str":
        raise TypeError
    return str(value)


def _to_choice(opt: Opt, value: Any) -> str:
    text = _to_str(opt, value)
    if text not in opt.choices:
        raise ValueError
    return text


def _to_int_list(opt: Opt, value: Any) -> list[int]:
    if isinstance(value, str):
        value = [part for part in value.replace(" ", "").strip("[]").split(",") if part]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise TypeError
    return [_to_int(opt, item) for item in value]


def _to_str_list(opt: Opt, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part]
    if not isinstance(value, list):
        raise TypeError
    return [_to_str(opt, item) for item in value]


_CONVERTERS: dict[str, Callable[[Opt, Any], Any]] = {
    "str": _to_str,
    "path": _to_str,
    "ref": _to_str,
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "choice": _to_choice,
    "int_list": _to_int_list,
    "str_list": _to_str_list,
}


def stage_type(name: str) -> StageType:
    return STAGE_TYPES[name]


def option_flag(option: str) -> str:
    """The CLI flag of an option: `epochs_per_round` -> `--epochs-per-round`."""
    return "--" + option.replace("_", "-")
