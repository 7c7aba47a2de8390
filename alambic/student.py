"""The finished student of a run directory: ``student.safetensors`` (weights) and ``student.json`` (what
rebuilds the network: arch, input shape, classes, and for a deployable method its ``deploy`` entry).

:mod:`alambic.run` writes them; :mod:`alambic.probe`, :mod:`alambic.export` and users read them back with
:func:`load_student`. It lives below both so that neither the probes nor the export import the whole run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from alambic import methods as _methods  # noqa: F401  (registers methods: a student.json may name one to rebuild)
from alambic.errors import AlambicError, RecipeError, RunDirError, UntrustedCodeError
from alambic.export.weights import load_weights
from alambic.models.zoo import build_model
from alambic.recipe.load import model_spec
from alambic.registry import METHODS

STUDENT_WEIGHTS, STUDENT_META = "student.safetensors", "student.json"


def load_student(run_dir: str | Path, *, trust_code: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The finished student of ``run_dir`` (rebuilt from ``student.json``) and that metadata.

    A run directory is data: loading one never runs code it names. A ``student.json`` whose arch is
    ``module`` (a user factory ``pkg.mod:factory``) would import and call that factory, so it is refused
    (:class:`~alambic.errors.UntrustedCodeError`, before any import) unless ``trust_code=True``: pass it only
    for a run directory you made, or trust as you would trust running its code (in a recipe:
    ``teacher: {run: DIR, trust_code: true}``; on the command line: ``alambic export --trust-code``). A
    ``deploy.method`` must name a registered method. A ``student.json`` that is not valid JSON, lacks a key
    or holds a value of the wrong type is a :class:`~alambic.errors.RunDirError` naming the file.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / STUDENT_META
    if not meta_path.exists():
        raise RunDirError(f"{run_dir} has no finished student ({meta_path.name} missing): did the run finish?")
    if student_kind(meta_path) == "causal_lm":  # a language run: its student is a transformers directory
        return load_causal_lm_student(run_dir, meta_path)
    meta = read_student_meta(meta_path)
    try:
        spec = model_spec(meta["arch"], "arch")
    except RecipeError as exc:  # one line: the first problem and how many more
        lines = str(exc).splitlines() or ["invalid"]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise RunDirError(f"{meta_path}: {lines[0]}{more}") from None
    if spec.arch == "module" and not trust_code:
        raise UntrustedCodeError(
            f"{meta_path} names the code factory '{spec.options.module}', which loading the run would import and "
            "run: if you trust this run directory, pass trust_code=True (recipe: teacher.trust_code: true; "
            "CLI: --trust-code)"
        )
    model = build_model(spec, tuple(meta["input_shape"]), meta["num_classes"], what=f"student of {run_dir}")
    if "deploy" in meta:
        method = meta["deploy"]["method"]
        if method not in METHODS:
            raise RunDirError(f"{meta_path}: deploy.method '{method}' is not a registered method "
                              f"({METHODS.known(method)})")
        try:
            model = METHODS.get(method).obj.rebuild(model, meta["deploy"])
        except NotImplementedError:
            raise RunDirError(f"{meta_path}: deploy.method '{method}' does not wrap a deployed student") from None
        except AlambicError as exc:
            raise RunDirError(f"{meta_path}: deploy: {' '.join(str(exc).split())}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{meta_path}: deploy section does not fit method '{method}' "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    load_weights(model, run_dir / STUDENT_WEIGHTS)
    return model, meta


def student_kind(meta_path: Path) -> str | None:
    """``student.json``'s ``kind`` (``causal_lm`` for a language run), None when absent or unreadable (then
    :func:`read_student_meta` says what is wrong)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta.get("kind") if isinstance(meta, dict) else None


def load_causal_lm_student(run_dir: Path, meta_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a language run: the transformers causal LM saved in ``RUN/<dir>`` (``student/``), in
    eval mode, and ``student.json``. Loading runs no code: ``trust_remote_code`` stays off and only
    safetensors weights are read (a pickled ``pytorch_model.bin`` is refused)."""
    meta = json.loads(meta_path.read_text())
    folder = meta.get("dir")
    if not isinstance(folder, str) or not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
        raise RunDirError(f"{meta_path}: 'dir' must name the student's folder inside the run, got "
                          f"{json.dumps(folder)[:60]}")
    path = run_dir / folder
    if not path.is_dir():
        raise RunDirError(f"{run_dir} has no student directory {folder}/: did the run finish?")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise AlambicError("loading a language run's student needs transformers: pip install 'alambic[llm]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        line = " ".join(str(exc).split())[:200]
        raise RunDirError(f"{path}: not a loadable causal LM ({type(exc).__name__}: {line})") from None
    return model.eval(), meta


def read_student_meta(path: Path) -> dict[str, Any]:
    """``student.json`` parsed and checked: a dict with ``arch`` (a dict), ``input_shape`` (positive ints),
    ``num_classes`` (a positive int), optional ``class_names`` (strings), ``features`` (a string) and
    ``deploy`` (a dict naming a ``method``); anything else is one line naming the file."""
    try:
        meta = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{path}: must hold a JSON object, not {type(meta).__name__}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = [
        ("arch", True, lambda v: isinstance(v, dict), "an object (arch and its options)"),
        ("input_shape", True, lambda v: isinstance(v, list) and len(v) > 0 and all(is_int(d) and d > 0 for d in v),
         "a non-empty list of positive integers"),
        ("num_classes", True, lambda v: is_int(v) and v > 0, "a positive integer"),
        ("class_names", False, lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
         "a list of strings"),
        ("features", False, lambda v: v is None or isinstance(v, str), "a tap path (string)"),
        ("deploy", False, lambda v: isinstance(v, dict) and isinstance(v.get("method"), str),
         "an object naming its method"),
    ]
    for key, required, ok, want in checks:
        if key not in meta:
            if required:
                raise RunDirError(f"{path}: required key '{key}' is missing")
            continue
        if not ok(meta[key]):
            raise RunDirError(f"{path}: '{key}' must be {want}, got {json.dumps(meta[key])[:60]}")
    return meta
