"""Load a YAML recipe, apply ``key.sub=value`` overrides and validate it into a :class:`Recipe`.

Validation is two-phase: pydantic checks the common structure, then each section that names a registry
entry has its own options checked against that entry's ``Config``. Every problem becomes one line that
names the full key path, collected into a single :class:`~alambic.errors.RecipeError`.

Hostile input is refused before it costs anything: a file over :data:`MAX_RECIPE_BYTES` or not UTF-8 is not
parsed; duplicate keys, recursive aliases, nesting deeper than :data:`MAX_YAML_DEPTH` and documents of more
than :data:`MAX_YAML_VALUES` values (aliases expanded) are refused by the YAML reader; and before pydantic sees a value, every number is checked
centrally (:func:`number_problems`): no nan or infinity, no integer beyond 64 bits, and no boolean where
a field (of the schema or of any registered ``Config``) wants a number. A value echoed in an error is cut
to :data:`ECHO_CHARS` characters.
"""

from __future__ import annotations

import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from alambic.errors import RecipeError
from alambic.recipe.schema import ModelSpec, Recipe, Selector
from alambic.registry import DATASETS, METHODS, MODELS, Registry

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

MAX_RECIPE_BYTES = 2**20  #: a recipe or suite file is refused above 1 MiB, before it is parsed
MAX_YAML_VALUES = 100_000  #: values of a YAML document, each alias counted as every value it repeats
MAX_YAML_DEPTH = 64  #: nesting levels of a YAML document
ECHO_CHARS = 80  #: a value echoed in an error message is cut to this many characters
MAX_LINE_CHARS = 400  #: an error line is cut to this many characters


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
    """A recipe (or suite) file as a mapping; any problem with the file is one RecipeError naming it."""
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {_bytes(size)} is over the limit of {_bytes(MAX_RECIPE_BYTES)} for a YAML file")
    with path.open("rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:  # grew since stat
        raise RecipeError(f"{path}: over the limit of {_bytes(MAX_RECIPE_BYTES)} for a YAML file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}), "
                          "so not YAML") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """YAML ``text`` as Python data, read safely: no duplicate keys, no recursive alias, at most
    :data:`MAX_YAML_VALUES` values once aliases are expanded. Errors name ``where`` (and the line)."""
    loader = _Loader(text)
    try:
        aliases = _prescan(text, where)
        node = loader.get_single_node()
        if node is None:
            return None
        if aliases:
            _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        kind = RecipeError if isinstance(exc, yaml.constructor.ConstructorError) else _YamlSyntaxError
        raise kind(_clip(f"{place}: invalid YAML: {problem}")) from None
    except RecursionError:
        raise RecipeError(f"{where}: invalid YAML: nested too deeply") from None
    except ValueError as exc:  # a value YAML reads but Python cannot hold (an integer of 5000 digits)
        raise RecipeError(_clip(f"{where}: invalid YAML: {exc}")) from None
    finally:
        loader.dispose()


class _YamlSyntaxError(RecipeError):
    """Text that is not YAML at all (an override value then stays the text itself)."""


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml parses 1 MiB in a second, not a minute
    """The safe loader, refusing a key given twice in one mapping (YAML would keep only the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then an explicit key overriding it is the point of a merge
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor says so
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(key)} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _prescan(text: str, where: str) -> bool:
    """Walk the YAML events (no tree is built) and stop at the first of MAX_YAML_DEPTH nesting levels or
    MAX_YAML_VALUES values: libyaml's composer recurses (a deep document crashes the process) and its
    parser slows down with depth. True when the document has aliases."""
    loader = _Loader(text)
    depth = values = aliases = 0
    try:
        while not isinstance(event := loader.get_event(), yaml.StreamEndEvent):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            elif isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                values += 1
                if values > MAX_YAML_VALUES:
                    raise RecipeError(f"{where}:{event.start_mark.line + 1}: holds more than {MAX_YAML_VALUES} "
                                      "values: refused")
                if not isinstance(event, yaml.ScalarEvent):
                    depth += 1
                    if depth > MAX_YAML_DEPTH:
                        raise RecipeError(f"{where}:{event.start_mark.line + 1}: invalid YAML: nested deeper than "
                                          f"{MAX_YAML_DEPTH} levels")
    finally:
        loader.dispose()
    return aliases > 0


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a recursive alias, and a document whose aliases expand it past MAX_YAML_VALUES values
    (a "billion laughs" costs nothing to parse: only whoever walks the expanded data pays)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:  # iterative post-order: expanded size of each distinct node, once
        node, done = stack.pop()
        if id(node) in sizes and not done:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = total = 1 + sum(sizes[id(c)] for c in children)
            if total > MAX_YAML_VALUES:
                raise RecipeError(f"{where}:{node.start_mark.line + 1}: aliases expand this value to more than "
                                  f"{MAX_YAML_VALUES} values (an alias bomb?): refused")
            continue
        if id(node) in on_path:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise RecipeError(f"{where}:{child.start_mark.line + 1}: invalid YAML: an alias refers to a value "
                                  "that contains it (recursive)")
            if id(child) not in sizes:
                stack.append((child, False))


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in nested ``data``; the value is parsed as YAML (``3``, ``1e-3``, ``[8, 16]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{item}': expected key.path=value")
    parts = key.strip().split(".")
    try:
        value = parse_yaml(raw, f"override '{_clip(item, ECHO_CHARS)}'") if raw.strip() else None
    except _YamlSyntaxError:
        value = raw  # not YAML: the text itself
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
    hostile = number_problems(data, Recipe)
    if hostile:
        raise RecipeError("\n".join(hostile))
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
        raise RecipeError("\n".join(_clip(p) for p in problems))
    return recipe


def _bind(section: Selector, registry: Registry[Any], path: str, key: str, problems: list[str]) -> None:
    name = getattr(section, key)
    if name not in registry:
        problems.append(f"{path}.{key}: unknown {registry.kind} {_short(name)} ({registry.known(name)})")
        return
    config: type[BaseModel] = registry.get(name).config
    problems.extend(number_problems(section.raw_options(), config, path))
    try:
        section._options = config.model_validate(section.raw_options())
    except ValidationError as exc:
        problems.extend(format_errors(exc, prefix=path))


def model_spec(data: dict[str, Any], path: str) -> ModelSpec:
    """A validated :class:`ModelSpec` from plain data (e.g. a finished run's ``student.json``)."""
    hostile = number_problems(data, ModelSpec, path)
    if hostile:
        raise RecipeError("\n".join(hostile))
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError("\n".join(format_errors(exc, prefix=path))) from None
    problems: list[str] = []
    _bind(spec, MODELS, path, "arch", problems)
    if problems:
        raise RecipeError("\n".join(problems))
    return spec


def missing_teacher(recipe: Recipe, *, python: bool = True) -> str | None:
    """Why ``recipe`` cannot run as it is: its method needs a teacher and it has no teacher section (None
    when it can). A recipe like this is valid, since a Python caller may bring the teacher
    (``alambic.run(recipe, out, teacher=...)``); the run, ``alambic validate`` and a bench refuse it. With
    ``python=False`` the message is for the command line, where no teacher can be brought."""
    from alambic.methods.base import Method

    method_cls: type[Method] = METHODS.get(recipe.method.name).obj
    if not method_cls.needs_teacher or recipe.teacher_specs():
        return None
    if not python:
        return f"method.name: '{recipe.method.name}' needs a teacher, but the recipe has no teacher section"
    hint = ("; for this self-supervised method, an EMA of the student: teacher: {ema: {momentum: 0.996, "
            "end_momentum: 1.0}}") if method_cls.self_supervised else ""
    return (f"method '{recipe.method.name}' needs a teacher: add a teacher section to the recipe, or pass "
            f"teacher= to alambic.run{hint}")


def _cross_checks(recipe: Recipe, files: bool = True) -> list[str]:
    problems = modality_problems(recipe)
    for path, teacher in _teacher_paths(recipe) if files else []:
        if teacher.run is not None and not (teacher.run / "student.json").is_file():
            problems.append(f"{path}.run: {teacher.run} is not a finished alambic run (no student.json)")
        if teacher.transfer is not None and not (teacher.transfer.run / "student.json").is_file():
            problems.append(f"{path}.transfer.run: {teacher.transfer.run} is not a finished alambic run "
                            f"(no student.json)")
        if teacher.weights is not None and not teacher.weights.is_file():
            problems.append(f"{path}.weights: file not found: {teacher.weights}")
    return problems


def modality_problems(recipe: Recipe) -> list[str]:
    """A language recipe (a method with ``modality = "text"``) takes text data, a causal LM student
    (``hf``, ``hf_config``, ``prune``) and a causal LM teacher (``teacher.hf``); any other recipe none of them."""
    text = getattr(METHODS.get(recipe.method.name).obj, "modality", "tensor") == "text"
    want = "a language method" if text else f"method '{recipe.method.name}'"
    problems = []
    if (DATASETS.get(recipe.data.name).extra.get("modality") == "text") != text:
        kinds = ("text data (" + ", ".join(n for n in DATASETS.names() if DATASETS.get(n).extra.get("modality")
                                            == "text") + ")") if text else "tensor data"
        problems.append(f"data.name: {want} needs {kinds}, not '{recipe.data.name}'")
    if (MODELS.get(recipe.student.arch).extra.get("modality") == "text") != text:
        kinds = "a causal LM (hf, hf_config or prune)" if text else "a network for tensors"
        problems.append(f"student.arch: {want} needs {kinds}, not '{recipe.student.arch}'")
    for path, spec in _teacher_paths(recipe):
        if (spec.hf is not None) != text:
            problems.append(f"{path}: {want} needs " + ("a causal LM teacher: {hf: DIR_OR_HUB_NAME}" if text
                                                         else "a teacher that is not a causal LM (hf)"))
    if text and recipe.teachers is not None:
        problems.append("teachers: a language run takes one teacher (teacher: {hf: ...})")
    if text and recipe.views is not None:
        problems.append("views: a language run takes no augmented views")
    if text and recipe.data.labeled_fraction != 1.0:
        problems.append("data.labeled_fraction: text data has no labels to hide (the targets are the text)")
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
        lines.append(_clip(f"{path}: {_message(err)}"))
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
    return f"{msg[0].lower()}{msg[1:]}, got {_short(value)}" if not isinstance(value, dict) else msg


# -- numbers and echoes ------------------------------------------------------------------------------------------

_INT_LIMIT = 2**63
_MAX_NUMBER_PROBLEMS = 20


def number_problems(value: Any, annotation: Any, path: str = "") -> list[str]:
    """What no recipe value may be, found before pydantic sees it, by key path: a float that is nan or
    infinite (anywhere: a learning rate of .inf validates and fails at step 2), an integer beyond 64 bits
    (anywhere: the random generators overflow), and a boolean where ``annotation`` (a model class, a
    field type) wants a number (pydantic would read ``batch_size: true`` as 1)."""
    problems: list[str] = []
    _scan(value, annotation, path, problems)
    return problems


def _scan(value: Any, ann: Any, path: str, problems: list[str]) -> None:
    if len(problems) >= _MAX_NUMBER_PROBLEMS:
        return
    where = path or "recipe"
    if isinstance(value, bool):
        if _wants_number(ann):
            problems.append(f"{where}: must be a number, not a boolean, got {str(value).lower()}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            problems.append(f"{where}: must be a finite number, got {value}")
    elif isinstance(value, int):
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            problems.append(f"{where}: must fit in 64 bits (from -2**63 to 2**63 - 1), got {_short(value)}")
    elif isinstance(value, dict):
        model = _model_of(ann)
        fields = {(f.alias or n): f.annotation for n, f in model.model_fields.items()} if model else {}
        values = _args_of(ann, dict)
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            _scan(item, fields.get(key) if model else (values[1] if len(values) == 2 else None), sub, problems)
    elif isinstance(value, (list, tuple)):
        items = _args_of(ann, list, tuple, set, frozenset)
        for i, item in enumerate(value):
            if len(items) == 2 and items[1] is Ellipsis or len(items) == 1:
                item_ann = items[0]
            else:
                item_ann = items[i] if i < len(items) else None
            _scan(item, item_ann, f"{path}.{i}" if path else str(i), problems)


def _unwrap(ann: Any) -> Any:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _members(ann: Any) -> list[Any]:
    ann = _unwrap(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [_unwrap(a) for a in typing.get_args(ann)]
    return [ann]


def _wants_number(ann: Any) -> bool:
    members = _members(ann)
    if any(m is bool or m is Any or m is None for m in members):
        return False
    return any(m in (int, float) for m in members)


def _model_of(ann: Any) -> type[BaseModel] | None:
    for m in _members(ann):
        if isinstance(m, type) and issubclass(m, BaseModel):
            return m
    return None


def _args_of(ann: Any, *origins: type) -> tuple[Any, ...]:
    """The type arguments of the first member of ``ann`` that is one of ``origins`` (``list[int]``: (int,))."""
    import collections.abc as abc

    aliases = {list: (abc.Sequence, abc.MutableSequence), tuple: (), set: (abc.Set, abc.MutableSet),
               frozenset: (), dict: (abc.Mapping, abc.MutableMapping)}
    for m in _members(ann):
        origin = typing.get_origin(m)
        if origin is not None and any(origin is o or origin in aliases[o] for o in origins):
            return typing.get_args(m)
    return ()


def _short(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error never echoes a whole (huge) value."""
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 8, 8, 8
    try:
        text = short.repr(value)
    except Exception:  # a foreign object whose repr fails
        text = f"<{type(value).__name__}>"
    return _clip(text, limit)


def _clip(text: str, limit: int = MAX_LINE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def dump_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
