"""Recipes: whole lottery-ticket pipelines from one YAML file (`spkprune run`), resumable and idempotent."""

from spkprune.recipes.loading import apply_override, load_recipe, parse_recipe
from spkprune.recipes.messages import RecipeError
from spkprune.recipes.recipe import Recipe, Stage, stage_hash
from spkprune.recipes.runner import RunReport, StageOutcome, plan, run_recipe
from spkprune.recipes.schema import STAGE_TYPES, StageOption, StageType
from spkprune.recipes.summary import plan_frame, summary_frame

__all__ = [
    "Recipe",
    "RecipeError",
    "RunReport",
    "STAGE_TYPES",
    "Stage",
    "StageOption",
    "StageOutcome",
    "StageType",
    "apply_override",
    "load_recipe",
    "parse_recipe",
    "plan",
    "plan_frame",
    "run_recipe",
    "stage_hash",
    "summary_frame",
]
