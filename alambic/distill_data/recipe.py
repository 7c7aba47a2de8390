"""The distillation recipe: which data, which teacher, which networks, which method, how large a set.

Strict like a run's recipe (:mod:`alambic.recipe.schema`), with the same YAML reader (hostile input
refused), overrides (``distill.steps=500``) and one-line errors naming the key path::

    name: digits-krr-st
    seed: 0
    data: {name: digits}                       # the set is distilled from this data's training split
    teacher: {run: runs/digits-byol}           # a frozen network: KRR-ST's targets, herding's feature space
    teacher_feature: pool                      # its representation (default: its run's, or the zoo default)
    network: {arch: cnn, channels: [32, 32]}   # what KRR-ST's pool trains and DM samples at random
    distill: {method: krr_st, images_per_class: 1, steps: 2000}

``alambic distill-data RECIPE --out DIR`` writes the set (:mod:`alambic.distill_data.synthetic_set`);
``data: {distilled: DIR}`` in a run's recipe trains a student on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from alambic.errors import RecipeError
from alambic.recipe.schema import (
    DataSpec,
    ModelSpec,
    Selector,
    Strict,
    TeacherSpec,
    _seed,
    _teacher_resolved,
)
from alambic.registry import Registry

DATA_DISTILLERS: Registry[Any] = Registry("data distillation method")
"""``distill.method`` names: each entry builds a distiller from a :class:`~alambic.distill_data.build.Context`
and its validated options."""


class DistillSpec(Selector):
    """``distill:``: the method (a :data:`DATA_DISTILLERS` name), the set's size, and the method's options."""

    method: str = "random"
    images_per_class: int = Field(1, ge=1, description="images of each class in the set (m = classes x this)")


class DistillRecipe(Strict):
    name: str = "distill"
    seed: int = _seed()
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec | None = Field(None, description="a finished run as frozen teacher ({run: DIR}): KRR-ST's "
                                        "targets, herding's feature space, and the targets stored with every set")
    teacher_feature: str | None = Field(None, description="tap of the teacher's representation; None: the run's "
                                        "recorded features (self-supervised runs), else the zoo default (cnn: pool)")
    network: ModelSpec = Field(default_factory=lambda: ModelSpec(arch="cnn"),
                               description="the architecture KRR-ST's pool trains and DM draws at random")
    distill: DistillSpec = Field(default_factory=DistillSpec)
    threads: int | None = Field(1, ge=1, description="torch CPU threads")
    device: str = Field("cpu", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    checkpoint_every: int = Field(200, ge=1, description="outer steps between checkpoints (resume after a kill)")
    log_every: int = Field(100, ge=1, description="outer steps between progress lines")

    @model_validator(mode="after")
    def _frozen_teacher(self) -> DistillRecipe:
        t = self.teacher
        if t is not None and (t.run is None or t.cache != "off"):
            raise ValueError("a distillation takes a finished run as its frozen teacher (teacher: {run: DIR}), "
                             "without cache")
        return self

    def resolved(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude={"data", "network", "distill", "teacher"})
        out["data"] = self.data.resolved()
        out["network"] = self.network.resolved()
        out["distill"] = self.distill.resolved()
        if self.teacher is not None:
            out["teacher"] = _teacher_resolved(self.teacher)
        order = ["name", "seed", "data", "teacher", "teacher_feature", "network", "distill"]
        return {**{k: out[k] for k in order if k in out}, **{k: v for k, v in out.items() if k not in order}}


def load_distill_recipe(source: str | Path | dict[str, Any], overrides: Iterable[str] = (), *,
                        files: bool = True) -> DistillRecipe:
    """A validated :class:`DistillRecipe` from a YAML path or a dict, with ``key.path=value`` overrides.
    ``files=False`` skips the check that the teacher run exists (validating a recipe's shape)."""
    import alambic.distill_data  # noqa: F401  (registers the distillers)
    from alambic.recipe.load import (
        _bind,
        _clip,
        _deep_copy,
        apply_override,
        format_errors,
        number_problems,
        read_yaml,
    )
    from alambic.registry import DATASETS, MODELS

    data = _deep_copy(source) if isinstance(source, dict) else read_yaml(Path(source))
    for item in overrides:
        apply_override(data, item)
    hostile = number_problems(data, DistillRecipe)
    if hostile:
        raise RecipeError("\n".join(hostile))
    try:
        recipe = DistillRecipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError("\n".join(format_errors(exc))) from None
    problems: list[str] = []
    _bind(recipe.data, DATASETS, "data", "name", problems)
    _bind(recipe.network, MODELS, "network", "arch", problems)
    options = {k: v for k, v in recipe.distill.raw_options().items()}
    if recipe.distill.method not in DATA_DISTILLERS:
        problems.append(f"distill.method: unknown {DATA_DISTILLERS.kind} '{recipe.distill.method}' "
                        f"({DATA_DISTILLERS.known(recipe.distill.method)})")
    else:
        entry = DATA_DISTILLERS.get(recipe.distill.method)
        problems.extend(number_problems(options, entry.config, "distill"))
        try:
            recipe.distill._options = entry.config.model_validate(options)
        except ValidationError as exc:
            problems.extend(format_errors(exc, prefix="distill"))
        if not problems and entry.extra.get("needs_teacher") and recipe.teacher is None:
            problems.append(f"teacher: distill.method '{recipe.distill.method}' needs a frozen teacher "
                            "(teacher: {run: DIR})")
    if files and recipe.teacher is not None and recipe.teacher.run is not None \
            and not (Path(recipe.teacher.run) / "student.json").is_file():
        problems.append(f"teacher.run: {recipe.teacher.run} is not a finished alambic run (no student.json)")
    if problems:
        raise RecipeError("\n".join(_clip(p) for p in problems))
    return recipe
