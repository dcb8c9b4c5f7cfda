"""Checks made before any stage runs: what a stage reads from disk or from the store must be there.

A recipe whose data directory or input file is missing, or whose stage needs something its model's family cannot do
yet (select-tokens on a family without selector locations, say), fails at once with the key path, not after earlier
stages ran for minutes. Hub references are not contacted here; the stage that reads one reports it.
"""

from __future__ import annotations

from pathlib import Path

from spkprune.errors import SpkpruneError
from spkprune.models import list_models
from spkprune.models.families import Family, family_of_meta, family_of_preset, require
from spkprune.recipes.messages import RecipeError
from spkprune.recipes.recipe import Recipe, Stage
from spkprune.store import Store, is_store_ref, parse_ref

DATA_FREE = ("digits",)  # data sets that ship with spkprune's dependencies


def preflight(recipe: Recipe, stages: list[Stage], store: Store | None) -> None:
    """RecipeError naming the first missing data directory, input file or store reference of `stages`."""
    where = str(recipe.path) if recipe.path else "recipe"
    families: dict[str, Family | None] = {}
    for stage in stages:
        base = f"{where}: stages.{stage.name}"
        _check_data(stage, base)
        for key, target in stage.inputs.items():
            if target.external is not None:
                _check_external(target.external, f"{base}.{key}", store)
        families[stage.name] = _family(stage, families, store)
        _check_capability(stage, families[stage.name], base)


def _check_data(stage: Stage, base: str) -> None:
    data_dir = stage.options.get("data_dir")
    dataset = stage.options.get("dataset")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise RecipeError(f"{base}.data_dir: folder {data_dir} does not exist; put the data set there or set data.data_dir")
    if stage.type.name == "train" and data_dir is None and dataset not in (None, *DATA_FREE):
        raise RecipeError(f"{base}.data_dir: data set {dataset} is read from local files; set data.data_dir")


def _check_external(ref: str, key: str, store: Store | None) -> None:
    if ref.startswith("hf://") or ref in list_models():  # the Hub is not contacted; a preset needs no file
        return
    if is_store_ref(ref) and "/" not in ref and not ref.endswith(".safetensors"):
        name, tag = parse_ref(ref)
        if store is None or not store.exists(name, tag):
            raise RecipeError(f"{key}: {ref} is not in the store; train or import it first, or fix the reference")
        return
    path = Path(ref).expanduser()
    if not path.exists():
        raise RecipeError(f"{key}: {ref} does not exist (a .safetensors file or an exported folder)")


def _family(stage: Stage, known: dict[str, "Family | None"], store: Store | None) -> "Family | None":
    """The model family a stage works on: its `arch`, else the family of what it reads; None when unknown here
    (a Hub reference, a file, a stage outside this run)."""
    arch = stage.options.get("arch")
    if stage.type.name == "train" and arch and arch in list_models():
        return family_of_preset(arch)
    for target in stage.inputs.values():
        if target.stage is not None and known.get(target.stage) is not None:
            return known[target.stage]
        if target.external is not None:
            return _family_of_ref(target.external, store)
    return None


def _family_of_ref(ref: str, store: Store | None) -> "Family | None":
    if ref in list_models():
        return family_of_preset(ref)
    if store is None or not is_store_ref(ref) or "/" in ref:
        return None
    name, tag = parse_ref(ref)
    artifact = store.get(name, tag)
    return family_of_meta(artifact.meta) if artifact is not None else None


def _needs(stage: Stage) -> tuple[str, str] | None:
    """(Family capability, the command that needs it) for a stage, None when every family can run it."""
    kind = stage.type.name
    if kind == "select-tokens":
        return "token_selection", "select-tokens"
    if kind == "flops":
        return "counted", "flops report"
    if kind == "compact":
        return "channel_structures", "compact"
    if kind == "imp" and stage.options.get("granularity") == "channel":
        return "channel_structures", "imp --granularity channel"
    return None


def _check_capability(stage: Stage, family: "Family | None", base: str) -> None:
    need = _needs(stage)
    if need is None:
        return
    try:
        require(family, *need)
    except SpkpruneError as error:
        raise RecipeError(f"{base}: {error}") from None
