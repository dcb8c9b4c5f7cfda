"""Checks made before any stage runs: what a stage reads from disk or from the store must be there.

A recipe whose data directory or input file is missing fails at once with the key path, not after earlier stages
ran for minutes. Hub references are not contacted here; the stage that reads one reports it.
"""

from __future__ import annotations

from pathlib import Path

from spkprune.models import list_models
from spkprune.recipes.messages import RecipeError
from spkprune.recipes.recipe import Recipe, Stage
from spkprune.store import Store, is_store_ref, parse_ref

DATA_FREE = ("digits",)  # data sets that ship with spkprune's dependencies


def preflight(recipe: Recipe, stages: list[Stage], store: Store | None) -> None:
    """RecipeError naming the first missing data directory, input file or store reference of `stages`."""
    where = str(recipe.path) if recipe.path else "recipe"
    for stage in stages:
        base = f"{where}: stages.{stage.name}"
        _check_data(stage, base)
        for key, target in stage.inputs.items():
            if target.external is not None:
                _check_external(target.external, f"{base}.{key}", store)


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
