"""Load a YAML recipe, apply ``key.sub=value`` overrides and validate it into a :class:`Recipe`.

Validation is two-phase: pydantic checks the common structure, then each section that names a registry
entry has its own options checked against that entry's ``Config``. Every problem becomes one line that
names the full key path, collected into a single :class:`~alambic.errors.RecipeError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from alambic.errors import RecipeError
from alambic.recipe.schema import ModelSpec, Recipe, Selector
from alambic.registry import DATASETS, METHODS, MODELS, Registry

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def load_recipe(source: str | Path | dict[str, Any] | None = None, overrides: Iterable[str] = ()) -> Recipe:
    """A validated recipe from a YAML path, a dict, or nothing (all defaults), with overrides applied."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = _deep_copy(source)
    else:
        data = read_yaml(Path(source))
    for item in overrides:
        apply_override(data, item)
    return validate(data)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in nested ``data``; the value is parsed as YAML (``3``, ``1e-3``, ``[8, 16]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{item}': expected key.path=value")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override '{item}': {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def validate(data: dict[str, Any], files: bool = True) -> Recipe:
    """The typed recipe, or a RecipeError listing every problem by key path. ``files=False`` skips the
    checks that teacher runs and weight files exist (comparing a saved recipe whose teacher has moved)."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError("\n".join(format_errors(exc))) from None
    problems: list[str] = []
    _bind(recipe.data, DATASETS, "data", "name", problems)
    _bind(recipe.student, MODELS, "student", "arch", problems)
    for path, spec in _teacher_paths(recipe):
        if spec.model is not None:
            _bind(spec.model, MODELS, f"{path}.model", "arch", problems)
    _bind(recipe.method, METHODS, "method", "name", problems)
    if not problems:
        problems += _cross_checks(recipe, files)
    if problems:
        raise RecipeError("\n".join(problems))
    return recipe


def _bind(section: Selector, registry: Registry[Any], path: str, key: str, problems: list[str]) -> None:
    name = getattr(section, key)
    if name not in registry:
        problems.append(f"{path}.{key}: unknown {registry.kind} '{name}' (known: {', '.join(registry.names())})")
        return
    config: type[BaseModel] = registry.get(name).config
    try:
        section._options = config.model_validate(section.raw_options())
    except ValidationError as exc:
        problems.extend(format_errors(exc, prefix=path))


def model_spec(data: dict[str, Any], path: str) -> ModelSpec:
    """A validated :class:`ModelSpec` from plain data (e.g. a finished run's ``student.json``)."""
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError("\n".join(format_errors(exc, prefix=path))) from None
    problems: list[str] = []
    _bind(spec, MODELS, path, "arch", problems)
    if problems:
        raise RecipeError("\n".join(problems))
    return spec


def _cross_checks(recipe: Recipe, files: bool = True) -> list[str]:
    from alambic.methods.base import Method

    problems = []
    method_cls: type[Method] = METHODS.get(recipe.method.name).obj
    if method_cls.needs_teacher and not recipe.teacher_specs():
        problems.append(f"method.name: '{recipe.method.name}' needs a teacher, but the recipe has no teacher section")
    for path, teacher in _teacher_paths(recipe) if files else []:
        if teacher.run is not None and not (teacher.run / "student.json").is_file():
            problems.append(f"{path}.run: {teacher.run} is not a finished alambic run (no student.json)")
        if teacher.transfer is not None and not (teacher.transfer.run / "student.json").is_file():
            problems.append(f"{path}.transfer.run: {teacher.transfer.run} is not a finished alambic run "
                            f"(no student.json)")
        if teacher.weights is not None and not teacher.weights.is_file():
            problems.append(f"{path}.weights: file not found: {teacher.weights}")
    return problems


def _teacher_paths(recipe: Recipe) -> list[tuple[str, Any]]:
    if recipe.teacher is not None:
        return [("teacher", recipe.teacher)]
    return [(f"teachers.{i}", t) for i, t in enumerate(recipe.teachers or [])]


def format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        path = ".".join(p for p in (prefix, loc) if p) or "recipe"
        lines.append(f"{path}: {_message(err)}")
    return lines


def _message(err: dict[str, Any]) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    msg = msg.replace("Input should be", "must be").replace("Input should", "must")
    if kind == "path_not_file":
        return f"file not found: {value}"
    if kind == "path_not_directory":
        return f"directory not found: {value}"
    return f"{msg[0].lower()}{msg[1:]}, got {value!r}" if not isinstance(value, dict) else msg


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def dump_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
