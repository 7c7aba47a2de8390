"""``alambic bench``: a grid of methods × settings × seeds, resumable, reported as mean ± std with a test vs ``ce``.

A suite file (strict, validated before anything trains; errors name the key path, exit status 2)::

    name: digits-tiny
    base: {data: {name: digits}, student: {arch: mlp, hidden: [16]}, train: {epochs: 2}}  # or a recipe path
    teacher: {student: {arch: mlp, hidden: [64]}, train: {epochs: 3}}   # optional: a recipe, or a run dir
    methods: {ce: {method: {name: ce}}, kd: ["method={name: kd, temperature: 2}"]}
    settings: {full: {}, scarce: {data.labeled_fraction: 0.1}}           # default: {default: {}}
    seeds: 3                                                           # or a list: [0, 1, 2]
    workers: 1
    nproc: 1                                                           # processes per cell (torchrun)
    teacher_cache: disk                                                # optional: off (default) | memory | disk

Each cell's recipe is ``base`` ← the method's overrides ← the setting's overrides ← ``seed``. Overrides are a
mapping (merged section by section; a dotted key sets one value) or a list of ``key.path=value`` strings
(applied like command-line overrides: a value replaces what was there). A ``method``/``student`` mapping
that names another entry than the base (``name``; ``arch`` or ``module``) replaces that section, because
the base's options belong to the other entry. Relative paths in the suite (``base``, ``teacher``) are
relative to the suite file.

A suite ``teacher`` recipe is trained once into ``OUT/teacher``; every cell whose method needs a teacher
and whose overrides bring none gets ``teacher.run`` pointing at it (the base's own teacher is dropped).
More teachers are named under ``teachers: {vit: RECIPE-OR-RUN-DIR}``, trained once into
``OUT/teachers/<name>``; a cell points at one with ``teacher: {run: "@vit"}`` (or inside ``teachers: [...]``,
where ``"@teacher"`` is the suite's main teacher): a ViT student's own teacher, a second ensemble member.
Cells whose method needs no teacher (``ce``) train alone, so their wall time is their own. With
``teacher_cache: disk`` every suite teacher a cell gets carries ``cache: disk``: its outputs on the
training samples are computed once and shared by all the cells (see ``alambic.teachers.cached``).

Cells run :func:`alambic.run.run` into ``OUT/runs/<setting>/<method>/seed<k>``, in-process or (``workers``
> 1) in worker processes started fresh (a fork server, else spawn; see :func:`_pool_context`). With
``nproc: N`` (or ``--nproc N``) each cell is ``torchrun --nproc-per-node N -m alambic run`` instead, launched
by :func:`alambic.train.distributed.launch` (``workers`` cells at a time, N processes each); its
``summary.json`` records the processes (``train.processes``), the results show them, and a finished cell
trained with another number of processes is not reused (reported as failed, like a cell of another recipe).
The suite's teachers train in one process. A finished
cell whose recorded recipe equals the cell's is skipped; a cell that fails has its one-line error recorded
in ``OUT/failures.json`` (and is tried again by the next run) and the bench goes on. Everything reported
is read back from the run directories, so ``--report-only`` (or a rerun of a finished bench) writes the
same ``results.md``/``results.csv``/``accuracy.png`` without training (:mod:`alambic.bench_report`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from alambic.errors import AlambicError, RecipeError, RunDirError
from alambic.recipe.load import (_deep_copy, apply_override, format_errors, load_recipe, missing_teacher,
                                 number_problems, read_yaml)
from alambic.recipe.schema import Recipe, Strict
from alambic.registry import METHODS
from alambic.run import SUMMARY, first_difference, is_finished, resolved_again, run
from alambic.train.state import atomic_write_text

if TYPE_CHECKING:  # the report (matplotlib, scipy) is imported when written, not by every worker process
    from alambic.bench_report import Row

SUITE_FILE, FAILURES = "suite.yaml", "failures.json"
BASELINE = "ce"
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_ENTRY_KEYS = {"method": ("name",), "student": ("arch", "module")}


class Suite(Strict):
    """What ``alambic bench`` runs; ``base``/``teacher`` are a recipe mapping or a path (see the module doc)."""

    name: str
    base: dict[str, Any] | str = Field(default_factory=dict)
    teacher: dict[str, Any] | str | None = None
    teachers: dict[str, dict[str, Any] | str] = Field(
        default_factory=dict, description="more teachers by name; a cell refers to one as teacher.run: '@name'")
    methods: dict[str, dict[str, Any] | list[str]] = Field(min_length=1)
    settings: dict[str, dict[str, Any] | list[str]] = Field(default_factory=lambda: {"default": {}}, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    workers: int = Field(1, ge=1)
    nproc: int = Field(1, ge=1, description="processes each cell trains in (torchrun; gloo on CPUs, NCCL on GPUs)")
    teacher_cache: Literal["off", "memory", "disk"] = Field(
        "off", description="teacher.cache of the suite's teachers in every cell (disk: shared by all cells)")

    @field_validator("base", "teacher", mode="before")
    @classmethod
    def _recipe_or_path(cls, value: Any) -> Any:
        if value is None or isinstance(value, (dict, str, Path)):
            return str(value) if isinstance(value, Path) else value
        raise ValueError(f"must be a recipe (a mapping) or a path, got {value!r}")

    @field_validator("teachers", mode="before")
    @classmethod
    def _named_teachers(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for label in value:
                if not isinstance(label, str) or not _LABEL.fullmatch(label) or label == "teacher":
                    raise ValueError(f"teacher name {label!r} must be a plain name other than 'teacher': "
                                     "it names a directory")
        return value

    @field_validator("methods", "settings", mode="before")
    @classmethod
    def _labelled_overrides(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic says it must be a mapping
        for label, overrides in value.items():
            if not isinstance(label, str) or not _LABEL.fullmatch(label):
                raise ValueError(f"label {label!r} must be a plain name (letters, digits, _ . + -): "
                                 "it names a directory")
            if overrides is None:
                value[label] = {}
            elif not isinstance(overrides, dict) and not (
                    isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides)):
                raise ValueError(f"{label}: overrides must be a mapping or a list of 'key.path=value', "
                                 f"got {overrides!r}")
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"a count of seeds must be at least 1, got {value}")
            return list(range(value))
        if isinstance(value, list) and len(set(map(str, value))) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        return value


@dataclass
class Cell:
    setting: str
    method: str
    seed: int
    dir: Path
    recipe: Recipe
    suite_teacher: bool = False  # teacher.run is the teacher this bench trained (OUT/teacher)

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.method}/seed{self.seed}"


@dataclass
class Plan:
    suite: Suite
    out: Path
    teacher_recipe: Recipe | None = None  # trained into out/teacher
    teacher_dir: Path | None = None
    named: dict[str, tuple[Recipe | None, Path]] = field(default_factory=dict)  # suite.teachers: (recipe, dir)
    cells: list[Cell] = field(default_factory=list)


# -- loading ---------------------------------------------------------------------------------------------------


def load_suite(source: str | Path | dict[str, Any]) -> tuple[Suite, Path]:
    """The validated suite and the directory its relative paths start from; base/teacher paths become mappings."""
    if isinstance(source, dict):
        data, root = _deep_copy(source), Path.cwd()
    else:
        path = Path(source)
        if path.is_dir():
            path = path / SUITE_FILE
        if not path.is_file():
            raise RecipeError(f"suite file not found: {path}")
        data, root = read_yaml(path), path.parent
    if hostile := number_problems(data, Suite):  # nan, 65-bit integers, workers: true
        raise RecipeError("\n".join(hostile))
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        raise RecipeError("\n".join(format_errors(exc, prefix=""))) from None
    if isinstance(suite.base, str):
        suite.base = _read_recipe(root / suite.base, "base")
    if isinstance(suite.teacher, str):
        where = (root / suite.teacher).resolve()
        if where.is_dir():
            if not (where / "student.json").is_file():
                raise RecipeError(f"teacher: {where} is not a finished alambic run (no student.json)")
            suite.teacher = str(where)
        else:
            suite.teacher = _read_recipe(where, "teacher")
    for name, spec in list(suite.teachers.items()):
        if isinstance(spec, str):
            where = (root / spec).resolve()
            if where.is_dir():
                if not (where / "student.json").is_file():
                    raise RecipeError(f"teachers.{name}: {where} is not a finished alambic run (no student.json)")
                suite.teachers[name] = str(where)
            else:
                suite.teachers[name] = _read_recipe(where, f"teachers.{name}")
    return suite, root


def _read_recipe(path: Path, key: str) -> dict[str, Any]:
    try:
        return read_yaml(path)
    except RecipeError as exc:
        raise RecipeError(f"{key}: {exc}") from None


def plan(suite: Suite, out: Path, *, teacher_ready: bool) -> Plan:
    """Every cell's validated recipe. Before the suite teacher exists (``teacher_ready`` False) cells are
    checked against a stand-in teacher of the same architecture, so a typo fails before anything trains."""
    out = Path(out).resolve()
    p = Plan(suite, out)
    if isinstance(suite.teacher, dict):
        p.teacher_recipe = _validated(suite.teacher, "teacher")
        p.teacher_dir = out / "teacher"
    elif isinstance(suite.teacher, str):
        p.teacher_dir = Path(suite.teacher)
    stand_in = None
    if p.teacher_recipe is not None and not teacher_ready:
        stand_in = {"model": p.teacher_recipe.resolved()["student"]}
    named: dict[str, dict[str, Any]] = {}  # "@name" -> the teacher section a cell gets
    if p.teacher_dir is not None:
        named["teacher"] = with_cache(stand_in or {"run": str(p.teacher_dir)}, suite.teacher_cache)
    for name, spec in suite.teachers.items():
        if isinstance(spec, dict):
            recipe = _validated(spec, f"teachers.{name}")
            p.named[name] = (recipe, out / "teachers" / name)
            ready = teacher_ready and is_finished(out / "teachers" / name)
            named[name] = {"run": str(out / "teachers" / name)} if ready else {"model": recipe.resolved()["student"]}
        else:
            p.named[name] = (None, Path(spec))
            named[name] = {"run": spec}
        named[name] = with_cache(named[name], suite.teacher_cache)
    problems: dict[str, set[tuple[str, str]]] = {}
    for setting, method, seed in grid(suite):
        data, injected = cell_data(suite, method, setting, seed, p.teacher_dir, stand_in)
        try:
            _refer_to_teachers(data, named)
        except RecipeError as exc:
            problems.setdefault(str(exc), set()).add((method, setting))
            continue
        try:
            recipe = load_recipe(data)
            if problem := missing_teacher(recipe, python=False):
                raise RecipeError(problem)
        except RecipeError as exc:
            for line in str(exc).splitlines():
                problems.setdefault(line, set()).add((method, setting))
            continue
        trained_teacher = injected and stand_in is None and p.teacher_recipe is not None
        p.cells.append(Cell(setting, method, seed, out / "runs" / setting / method / f"seed{seed}", recipe,
                            trained_teacher))
    if problems:
        raise RecipeError("\n".join(_locate(problems, suite)))
    return p


def grid(suite: Suite) -> list[tuple[str, str, int]]:
    return [(s, m, k) for s in suite.settings for m in suite.methods for k in suite.seeds]


def cell_data(suite: Suite, method: str, setting: str, seed: int, teacher_dir: Path | None,
              stand_in: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """The recipe mapping of one cell, and whether the suite's teacher was given to it."""
    data = _deep_copy(suite.base)
    if teacher_dir is not None:
        data.pop("teacher", None)
        data.pop("teachers", None)
    own_teacher = False
    for label, overrides in ((f"methods.{method}", suite.methods[method]),
                             (f"settings.{setting}", suite.settings[setting])):
        apply_overrides(data, overrides, label)
        probe: dict[str, Any] = {}
        apply_overrides(probe, overrides, label)
        own_teacher |= bool({"teacher", "teachers"} & set(probe))
    data["name"] = f"{suite.name}/{setting}/{method}"
    data["seed"] = seed
    section = data.get("method") or {}
    name = section.get("name", "ce") if isinstance(section, dict) else None
    inject = (teacher_dir is not None and not own_teacher and name in METHODS
              and METHODS.get(name).obj.needs_teacher)
    if inject:
        data["teacher"] = with_cache(stand_in if stand_in is not None else {"run": str(teacher_dir)},
                                     suite.teacher_cache)
    return data, inject


def with_cache(section: dict[str, Any], cache: str) -> dict[str, Any]:
    """A teacher section with the suite's ``teacher_cache`` (unchanged when it is "off")."""
    return section if cache == "off" else {**section, "cache": cache}


def _refer_to_teachers(data: dict[str, Any], named: dict[str, dict[str, Any]]) -> None:
    """Replace each teacher section ``{run: "@name"}`` of a cell by the suite teacher it names."""
    def resolve(spec: Any, where: str) -> Any:
        if isinstance(spec, dict) and isinstance(spec.get("run"), str) and spec["run"].startswith("@"):
            name = spec["run"][1:]
            if name not in named:
                raise RecipeError(f"{where}.run: no suite teacher named '{name}' (named: "
                                  f"{', '.join('@' + n for n in named) or 'none'})")
            return {**{k: v for k, v in spec.items() if k != "run"}, **named[name]}
        return spec

    if "teacher" in data:
        data["teacher"] = resolve(data["teacher"], "teacher")
    if isinstance(data.get("teachers"), list):
        data["teachers"] = [resolve(t, f"teachers.{i}") for i, t in enumerate(data["teachers"])]


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str], label: str) -> None:
    try:
        if isinstance(overrides, list):
            for item in overrides:
                apply_override(data, item)
        else:
            _merge(data, overrides)
    except RecipeError as exc:
        raise RecipeError(f"{label}: {exc}") from None


def _merge(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"{'.'.join(parts[: i + 1])} is not a section")
            node = child
        old, leaf = node.get(parts[-1]), parts[-1]
        other_entry = key in _ENTRY_KEYS and isinstance(value, dict) and isinstance(old, dict) and any(
            k in value and value[k] != old.get(k) for k in _ENTRY_KEYS[key])
        if isinstance(value, dict) and isinstance(old, dict) and not other_entry:
            _merge(old, value)
        else:
            node[leaf] = _deep_copy(value)


def _validated(data: dict[str, Any], label: str) -> Recipe:
    try:
        return load_recipe(data)
    except RecipeError as exc:
        raise RecipeError("\n".join(f"{label}: {line}" for line in str(exc).splitlines())) from None


def _locate(problems: dict[str, set[tuple[str, str]]], suite: Suite) -> list[str]:
    """Name the smallest part of the suite a problem comes from: a method, a setting, or every cell."""
    lines = []
    for msg, where in problems.items():
        methods, settings = {m for m, _ in where}, {s for _, s in where}
        if len(where) == len(suite.methods) * len(suite.settings) > 1:
            lines.append(f"every cell: {msg}")
        elif len(methods) == 1 and len(settings) == len(suite.settings):
            lines.append(f"methods.{next(iter(methods))}: {msg}")
        elif len(settings) == 1 and len(methods) == len(suite.methods):
            lines.append(f"settings.{next(iter(settings))}: {msg}")
        else:
            lines += [f"methods.{m} with settings.{s}: {msg}" for m, s in sorted(where)]
    return sorted(lines)


# -- running ---------------------------------------------------------------------------------------------------


def bench(suite: str | Path | dict[str, Any], out: str | Path, *, workers: int | None = None,
          nproc: int | None = None, report_only: bool = False, progress: bool = True,
          console: Console | None = None) -> list[Row]:
    """Run (or with ``report_only`` only report) a suite into ``out``; returns one row per cell.

    With more than one worker, call this from a script under ``if __name__ == "__main__":``, as for any
    :mod:`multiprocessing` code.
    """
    from alambic.bench_report import write_outputs

    console = console or Console()
    loaded, _ = load_suite(suite)
    if workers is not None:
        if workers < 1:
            raise RecipeError(f"--workers must be at least 1, got {workers}")
        loaded.workers = workers
    if nproc is not None:
        if nproc < 1:
            raise RecipeError(f"--nproc must be at least 1, got {nproc}")
        loaded.nproc = nproc
    out = Path(out)
    _check_out(out)
    if report_only and not out.is_dir():
        raise RunDirError(f"{out} holds no bench to report: run it without --report-only first")
    p = plan(loaded, out, teacher_ready=_teacher_ready(loaded, out))
    if not report_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUITE_FILE).write_text(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))
        trained = False
        if p.teacher_recipe is not None and _state(p.teacher_dir, p.teacher_recipe)[0] != "ok":
            console.print(f"[bold]{loaded.name}[/]: training the suite's teacher -> {p.teacher_dir}")
            run(p.teacher_recipe, p.teacher_dir, resume=True, progress=progress)
            trained = True
        for name, (recipe, where) in p.named.items():
            if recipe is not None and _state(where, recipe)[0] != "ok":
                console.print(f"[bold]{loaded.name}[/]: training teacher '{name}' -> {where}")
                run(recipe, where, resume=True, progress=progress)
                trained = True
        if trained:
            p = plan(loaded, out, teacher_ready=True)
    else:
        if p.teacher_recipe is not None and _state(p.teacher_dir, p.teacher_recipe)[0] != "ok":
            raise RunDirError(f"{p.teacher_dir}: the suite's teacher has not finished: nothing to report")
        unfinished = [n for n, (r, w) in p.named.items() if r is not None and not is_finished(w)]
        if unfinished:
            raise RunDirError(f"{out}: suite teacher(s) {unfinished} have not finished: nothing to report")
    failures = _read_failures(out)
    states = {c.key: _state(c.dir, c.recipe, c.suite_teacher, loaded.nproc) for c in p.cells}
    rows = {c.key: _row(c, *states[c.key], failures.get(c.key)) for c in p.cells}
    todo = [c for c in p.cells if states[c.key][0] == "missing"]
    if todo and not report_only:
        def done(cell: Cell, summary: dict[str, Any] | None, error: str | None) -> None:
            rows[cell.key] = _row(cell, "ok" if summary else "failed", summary, error)
            if summary:
                failures.pop(cell.key, None)
            else:
                failures[cell.key] = error
            _write_failures(out, failures)
        _run_cells(todo, loaded.workers, loaded.nproc, done, progress, console)
    teacher = None
    if p.teacher_dir is not None and is_finished(p.teacher_dir):
        teacher = json.loads((p.teacher_dir / SUMMARY).read_text())
    result = [rows[c.key] for c in p.cells]
    write_outputs(out, loaded, result, baseline(p), teacher, console)
    return result


def _check_out(out: Path) -> None:
    """Refuse an ``out`` that is (or lies under) a file, before anything is written."""
    for where in (out, *out.parents):
        if where.exists():
            if not where.is_dir():
                what = "is a file" if where == out else f"lies under {where}, which is a file"
                raise RecipeError(f"bench: --out {out} {what}, not a directory")
            return


def baseline(p: Plan) -> str | None:
    """The method labelled ``ce``, else the first whose recipe trains with ``method.name: ce``."""
    if BASELINE in p.suite.methods:
        return BASELINE
    return next((c.method for c in p.cells if c.recipe.method.name == BASELINE), None)


def _teacher_ready(suite: Suite, out: Path) -> bool:
    """Every teacher the bench trains itself has finished (so cells can point at the real runs)."""
    root = Path(out).resolve()
    named = all(is_finished(root / "teachers" / n) for n, spec in suite.teachers.items() if isinstance(spec, dict))
    return named and (not isinstance(suite.teacher, dict) or is_finished(root / "teacher"))


def _state(run_dir: Path, recipe: Recipe, suite_teacher: bool = False,
           nproc: int = 1) -> tuple[str, dict[str, Any] | None, str | None]:
    """("ok", summary, None) for a finished run of this recipe in ``nproc`` processes; ("stale", None, why)
    for a finished run of another recipe or process count (never reused, never overwritten: reported as
    failed); ("missing", None, None) else."""
    if not is_finished(run_dir):
        return "missing", None, None
    saved = resolved_again(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    expected = recipe.resolved()
    if suite_teacher and isinstance(saved.get("teacher"), dict) and "run" in saved["teacher"]:
        expected["teacher"] = {**expected["teacher"], "run": saved["teacher"]["run"]}  # the bench dir moved
    diff = first_difference(_without_speed_options(saved), _without_speed_options(expected))
    if diff is not None:
        return "stale", None, f"{run_dir} holds a finished run of another recipe (at {diff}): delete it to rerun"
    summary = json.loads((run_dir / SUMMARY).read_text())
    trained_in = summary.get("train", {}).get("processes", 1)  # summaries before train.processes: one process
    if trained_in != nproc:
        return "stale", None, (f"{run_dir} holds a finished run in {trained_in} process(es), the bench asks for "
                               f"{nproc}: delete it to rerun, or use another --out")
    return "ok", summary, None


# options that change how fast a run goes or the memory it takes, never what it computes (each tested bit for
# bit): a teacher's cache (tests/unit/test_teacher_cache.py) and shard (tests/invariants/test_fsdp_teacher.py),
# train.gradient_checkpointing (the same gradients, recomputed: tests/unit/test_gradient_checkpointing.py) and
# train.pin_memory (the same batches). Everything else stays in the comparison, the ones that only round differently too
# (train.device, precision, compile, threads, train.shard: another summation order is another result).
_SPEED_TEACHER = ("cache", "shard")
_SPEED_TRAIN = ("gradient_checkpointing", "pin_memory")


def _without_speed_options(recipe: Any) -> Any:
    """A resolved recipe without the options that change how fast a run goes, not what it learns
    (:data:`_SPEED_TEACHER` of each teacher section, :data:`_SPEED_TRAIN` of ``train``), so switching the suite's
    ``teacher_cache`` or turning gradient checkpointing on for memory reuses finished cells."""
    if not isinstance(recipe, dict):
        return recipe
    out = dict(recipe)

    def drop(section: Any, keys: tuple[str, ...]) -> Any:
        return {k: v for k, v in section.items() if k not in keys} if isinstance(section, dict) else section

    out["teacher"] = drop(out.get("teacher"), _SPEED_TEACHER)
    if isinstance(out.get("teachers"), list):
        out["teachers"] = [drop(t, _SPEED_TEACHER) for t in out["teachers"]]
    out["train"] = drop(out.get("train"), _SPEED_TRAIN)
    return out


def _row(cell: Cell, status: str, summary: dict[str, Any] | None, error: str | None,
         recorded: str | None = None) -> Row:
    from alambic.bench_report import Row

    if status == "stale":
        status = "failed"
    elif status == "missing" and recorded:
        status, error = "failed", recorded
    elif status == "missing":
        error = "unfinished" if cell.dir.exists() else "not run"
    return Row.from_summary(cell.setting, cell.method, cell.seed, status, summary, error)


def _run_cells(cells: list[Cell], workers: int, nproc: int, done: Callable[[Cell, Any, Any], None],
               progress: bool, console: Console) -> None:
    columns = (TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task(cells[0].key, total=len(cells))

        def finished(cell: Cell, result: tuple[dict[str, Any] | None, str | None]) -> None:
            done(cell, *result)
            bar.update(task, advance=1, description=f"{cell.key} {'ok' if result[0] else 'failed'}")

        if workers == 1:
            for cell in cells:
                bar.update(task, description=f"{cell.key} …")
                finished(cell, run_cell(cell.recipe.resolved(), str(cell.dir), nproc))
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(cells)), mp_context=_pool_context()) as pool:
            futures = {pool.submit(run_cell, c.recipe.resolved(), str(c.dir), nproc): c for c in cells}
            try:
                for future in as_completed(futures):
                    finished(futures[future], future.result())
            except BrokenProcessPool as exc:
                raise AlambicError(f"a bench worker process died ({exc}); the cells it finished are kept: "
                                   "run the bench again to continue (--workers 1 runs cells in-process)") from None
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def _pool_context() -> multiprocessing.context.BaseContext:
    """Fresh processes, not forks of this one (a fork of a process whose torch or rich threads ran can
    deadlock). A fork server imports, once, what every run imports lazily on first use (torch's optimizers
    pull in torch._dynamo, digits needs scikit-learn, reports matplotlib): seconds of CPU each worker would
    otherwise spend before its first cell. A module that does not import is skipped by the server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["alambic.run", "alambic.report", "torch._dynamo", "sklearn.datasets"])
    return ctx


def run_cell(recipe: dict[str, Any], out: str, nproc: int = 1) -> tuple[dict[str, Any] | None, str | None]:
    """Run one cell (in a worker process or in-process; ``nproc`` > 1: under torchrun): (summary, None) or
    (None, its one-line error)."""
    if nproc > 1:
        return run_cell_processes(recipe, out, nproc)
    try:
        return run(load_recipe(recipe), out, resume=True, progress=False), None
    except Exception as exc:  # a failed cell is a row of the table, never the end of the bench
        if os.environ.get("ALAMBIC_DEBUG"):
            traceback.print_exc(file=sys.stderr)
        text = " / ".join(str(exc).split("\n")) or type(exc).__name__
        if isinstance(exc, AlambicError):
            return None, text
        return None, f"{type(exc).__name__}: {text} ({_origin(exc)}; ALAMBIC_DEBUG=1 prints the traceback)"


def run_cell_processes(recipe: dict[str, Any], out: str, nproc: int) -> tuple[dict[str, Any] | None, str | None]:
    """One cell as ``torchrun --nproc-per-node N -m alambic run RECIPE --out OUT --resume --quiet`` (the
    command the README gives for several processes, launched by :func:`alambic.train.distributed.launch`):
    (rank 0's summary, None), or (None, the run's one-line error)."""
    from alambic.train.distributed import launch

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cell-", dir=Path(out).parent) as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        done = launch(nproc, ["-m", "alambic", "run", str(path), "--out", str(out), "--resume", "--quiet"])
    if done.returncode == 0 and is_finished(Path(out)):
        return json.loads((Path(out) / SUMMARY).read_text()), None
    errors = list(dict.fromkeys(line[len("error: "):] for line in done.stderr.splitlines()
                                if line.startswith("error: ")))  # every rank says it: once
    if errors:
        return None, " / ".join(errors)
    tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
    return None, (f"torchrun ({nproc} processes) exited with status {done.returncode}: {tail[0].strip()[:300]} "
                  "(ALAMBIC_DEBUG=1 alambic run under torchrun shows the traceback)")


def _origin(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised ``exc``: where an unexpected error
    (a bug, most likely) came from, in one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "no traceback"
    f = frames[-1]
    return f"{_shown_path(f.filename)}:{f.lineno} in {f.name}"


def _shown_path(filename: str) -> str:
    """``alambic/...`` for a file of this package, found from the package's real location (a checkout may
    itself be a folder named ``alambic``); the bare file name for any other file."""
    path, package = Path(filename).resolve(), Path(__file__).resolve().parent
    return path.relative_to(package.parent).as_posix() if path.is_relative_to(package) else path.name


def _read_failures(out: Path) -> dict[str, str]:
    path = out / FAILURES
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_failures(out: Path, failures: dict[str, str]) -> None:
    atomic_write_text(out / FAILURES, json.dumps(dict(sorted(failures.items())), indent=2))
