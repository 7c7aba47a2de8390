"""Recipes: YAML in, a strict typed :class:`Recipe` out."""

from alambic.recipe.load import apply_override, dump_recipe, load_recipe, missing_teacher, validate
from alambic.recipe.schema import DataSpec, EvalSpec, MethodSpec, ModelSpec, Recipe, TeacherSpec, TrainSpec

__all__ = [
    "DataSpec", "EvalSpec", "MethodSpec", "ModelSpec", "Recipe", "TeacherSpec", "TrainSpec",
    "apply_override", "dump_recipe", "load_recipe", "missing_teacher", "validate",
]
